{{/*
Names and labels.
*/}}
{{- define "booking-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "booking-service.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "booking-service.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels common to every resource. */}}
{{- define "booking-service.labels" -}}
helm.sh/chart: {{ include "booking-service.chart" . }}
app.kubernetes.io/name: {{ include "booking-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: booking-durability-service
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component; usage: include "booking-service.componentLabels" (dict "root" $ "component" "email-worker") */}}
{{- define "booking-service.componentLabels" -}}
{{ include "booking-service.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "booking-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "booking-service.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Set on the pods that serve /metrics, so monitors and the metrics Service select only them. */}}
{{- define "booking-service.metricsLabel" -}}
booking-service/metrics: "true"
{{- end }}

{{- define "booking-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "booking-service.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "booking-service.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Plain configuration, as NAME: value. One definition feeds both the ConfigMap (for the
Deployments and the CronJob) and the inline env of the migration hook, which runs before
the release's ConfigMap exists.
*/}}
{{- define "booking-service.configData" -}}
{{- $c := .Values.config -}}
EMAIL_FROM: {{ $c.emailFrom | quote }}
LOG_LEVEL: {{ $c.logLevel | quote }}
LOG_FORMAT: {{ $c.logFormat | quote }}
{{- if $c.unleash.url }}
UNLEASH_URL: {{ $c.unleash.url | quote }}
{{- end }}
UNLEASH_APP_NAME: {{ $c.unleash.appName | quote }}
UNLEASH_ENVIRONMENT: {{ $c.unleash.environment | quote }}
FEATURE_EMAIL_QUEUE_ENABLED: {{ $c.features.emailQueueEnabled | toString | quote }}
FEATURE_POLICY_REQUOTE_ENABLED: {{ $c.features.policyRequoteEnabled | toString | quote }}
EMAIL_MAX_RETRIES: {{ $c.emailMaxRetries | int64 | toString | quote }}
EMAIL_MIN_BACKOFF_MS: {{ $c.emailMinBackoffMs | int64 | toString | quote }}
REDIS_HEARTBEAT_TIMEOUT_MS: {{ $c.redisHeartbeatTimeoutMs | int64 | toString | quote }}
RABBITMQ_QUEUE_TYPE: {{ $c.rabbitmq.queueType | quote }}
RABBITMQ_DELIVERY_LIMIT: {{ $c.rabbitmq.deliveryLimit | int64 | toString | quote }}
RABBITMQ_FAILOVER_SECONDS: {{ $c.rabbitmq.failoverSeconds | toString | quote }}
RECONCILE_GRACE_SECONDS: {{ $c.reconcileGraceSeconds | int64 | toString | quote }}
HEALTH_FILE: {{ $c.healthFile | quote }}
FLAG_CACHE_DIR: {{ $c.flagCacheDir | quote }}
PROMETHEUS_MULTIPROC_DIR: {{ $c.prometheusMultiprocDir | quote }}
METRICS_PORT: {{ $c.metricsPort | int64 | toString | quote }}
{{- range $name, $value := $c.extra }}
{{ $name }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* One env entry read from an existing Secret; usage: include "booking-service.secretEnv" (dict "root" $ "env" "DATABASE_URL" "ref" .Values.secrets.database) */}}
{{- define "booking-service.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ default .root.Values.secrets.existingSecret .ref.name | quote }}
      key: {{ .ref.key | quote }}
      {{- if .ref.optional }}
      optional: true
      {{- end }}
{{- end }}

{{/* Every secret the service reads, by reference only: the chart's own and extraSecretEnv. */}}
{{- define "booking-service.secretEnvs" -}}
{{ include "booking-service.secretEnv" (dict "root" . "env" "DATABASE_URL" "ref" .Values.secrets.database) }}
{{ include "booking-service.secretEnv" (dict "root" . "env" "BROKER_URL" "ref" .Values.secrets.broker) }}
{{ include "booking-service.secretEnv" (dict "root" . "env" "SMTP_URL" "ref" .Values.secrets.smtp) }}
{{- if .Values.config.unleash.url }}
{{ include "booking-service.secretEnv" (dict "root" . "env" "UNLEASH_API_TOKEN" "ref" .Values.secrets.unleashToken) }}
{{- end }}
{{ include "booking-service.secretEnv" (dict "root" . "env" "WEBHOOK_SIGNING_SECRET" "ref" .Values.secrets.webhookSigningSecret) }}
{{- range .Values.extraSecretEnv }}
{{ include "booking-service.secretEnv" (dict "root" $ "env" .name "ref" (dict "name" .secretName "key" .key "optional" .optional)) }}
{{- end }}
{{- end }}

{{/*
Merge of two maps as JSON: keys of .override win, nested maps are merged key by key. Unlike
sprig's merge and mergeOverwrite, whose handling of false and empty values depends on the Helm
release (helm/helm#5238, #9591), an override of false, 0 or [] always takes effect.
*/}}
{{- define "booking-service.deepMerge" -}}
{{- $out := deepCopy (default dict .base) }}
{{- range $key, $value := (default dict .override) }}
{{- if and (kindIs "map" $value) (kindIs "map" (get $out $key)) }}
{{- $_ := set $out $key (include "booking-service.deepMerge" (dict "base" (get $out $key) "override" $value) | fromJson) }}
{{- else }}
{{- $_ := set $out $key $value }}
{{- end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* The pod securityContext of a component (its `spec` values): podSecurityContext with the component's overrides. */}}
{{- define "booking-service.podSecurityContext" -}}
{{- include "booking-service.deepMerge" (dict "base" .root.Values.podSecurityContext "override" .spec.podSecurityContext) | fromJson | toYaml }}
{{- end }}

{{/* The container securityContext of a component: containerSecurityContext with the component's overrides. */}}
{{- define "booking-service.containerSecurityContext" -}}
{{- include "booking-service.deepMerge" (dict "base" .root.Values.containerSecurityContext "override" .spec.containerSecurityContext) | fromJson | toYaml }}
{{- end }}

{{/*
Operator-supplied containers (extraContainers, extraInitContainers), rendered with tpl; an entry
without a securityContext gets the component's container securityContext.
Usage: include "booking-service.extraContainers" (dict "root" $ "containers" .Values.extraContainers "securityContext" $sc)
*/}}
{{- define "booking-service.extraContainers" -}}
{{- $out := list }}
{{- range (tpl (toYaml .containers) .root | fromYamlArray) }}
{{- if not (hasKey . "securityContext") }}
{{- $_ := set . "securityContext" $.securityContext }}
{{- end }}
{{- $out = append $out . }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* The writable scratch space of a read-only root filesystem. */}}
{{- define "booking-service.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.scratch.tmpSizeLimit }}
- name: prometheus-multiproc
  emptyDir:
    sizeLimit: {{ .Values.scratch.metricsSizeLimit }}
- name: flag-cache
  emptyDir:
    sizeLimit: {{ .Values.scratch.flagCacheSizeLimit }}
{{- end }}

{{- define "booking-service.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: prometheus-multiproc
  mountPath: {{ .Values.config.prometheusMultiprocDir }}
- name: flag-cache
  mountPath: {{ .Values.config.flagCacheDir }}
{{- end }}

{{/* An exec probe running the service's health command; usage: include "booking-service.probe" (dict "root" $ "probe" .Values.probes.liveness) */}}
{{- define "booking-service.probe" -}}
exec:
  command:
    {{- range .root.Values.image.entrypoint }}
    - {{ . | quote }}
    {{- end }}
    {{- range .probe.command }}
    - {{ . | quote }}
    {{- end }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- with .probe.successThreshold }}
successThreshold: {{ . }}
{{- end }}
{{- end }}

{{/*
A pod spec. Arguments (dict):
  root       the top-level context
  component  component label value
  args       the service CLI arguments (after the entrypoint)
  spec       the role's values (resources, scheduling, terminationGracePeriodSeconds,
             podSecurityContext and containerSecurityContext overrides)
  longRunning  true: probes, the metrics port and extraContainers (sidecars)
  inlineEnv  true: plain config as inline env instead of the ConfigMap (pre-install hooks)
  serviceAccountName  overrides the chart's ServiceAccount
  restartPolicy  for Jobs
*/}}
{{- define "booking-service.podSpec" -}}
{{- $root := .root }}
{{- $spec := .spec }}
{{- $containerSecurityContext := include "booking-service.containerSecurityContext" . | fromYaml }}
{{- $probes := $root.Values.probes }}
{{- with $spec.probes }}
{{- $probes = mergeOverwrite (deepCopy $root.Values.probes) . }}
{{- end -}}
serviceAccountName: {{ default (include "booking-service.serviceAccountName" $root) .serviceAccountName }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
enableServiceLinks: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . | quote }}
  {{- end }}
{{- end }}
securityContext:
  {{- include "booking-service.podSecurityContext" . | nindent 2 }}
{{- with $spec.terminationGracePeriodSeconds }}
terminationGracePeriodSeconds: {{ . }}
{{- end }}
{{- with .restartPolicy }}
restartPolicy: {{ . }}
{{- end }}
{{- with $spec.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- with $spec.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $spec.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $spec.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $spec.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.extraInitContainers }}
initContainers:
  {{- include "booking-service.extraContainers" (dict "root" $root "containers" . "securityContext" $containerSecurityContext) | nindent 2 }}
{{- end }}
containers:
  - name: {{ .component }}
    image: {{ include "booking-service.image" $root | quote }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command:
      {{- range $root.Values.image.entrypoint }}
      - {{ . | quote }}
      {{- end }}
    args:
      {{- range .args }}
      - {{ . | quote }}
      {{- end }}
    {{- if .inlineEnv }}
    env:
      {{- range $name, $value := (include "booking-service.configData" $root | fromYaml) }}
      - name: {{ $name }}
        value: {{ $value | quote }}
      {{- end }}
    {{- else }}
    envFrom:
      - configMapRef:
          name: {{ include "booking-service.fullname" $root }}-config
    env:
    {{- end }}
      {{- include "booking-service.secretEnvs" $root | nindent 6 }}
      {{- with $root.Values.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- if .longRunning }}
    ports:
      - name: metrics
        containerPort: {{ $root.Values.config.metricsPort }}
        protocol: TCP
    startupProbe:
      {{- include "booking-service.probe" (dict "root" $root "probe" (get $probes "startup")) | nindent 6 }}
    livenessProbe:
      {{- include "booking-service.probe" (dict "root" $root "probe" (get $probes "liveness")) | nindent 6 }}
    readinessProbe:
      {{- include "booking-service.probe" (dict "root" $root "probe" (get $probes "readiness")) | nindent 6 }}
    {{- end }}
    resources:
      {{- toYaml $spec.resources | nindent 6 }}
    securityContext:
      {{- toYaml $containerSecurityContext | nindent 6 }}
    volumeMounts:
      {{- include "booking-service.volumeMounts" $root | nindent 6 }}
      {{- with $root.Values.extraVolumeMounts }}
      {{- tpl (toYaml .) $root | nindent 6 }}
      {{- end }}
  {{- if and .longRunning $root.Values.extraContainers }}
  {{- include "booking-service.extraContainers" (dict "root" $root "containers" $root.Values.extraContainers "securityContext" $containerSecurityContext) | nindent 2 }}
  {{- end }}
volumes:
  {{- include "booking-service.volumes" $root | nindent 2 }}
  {{- with $root.Values.extraVolumes }}
  {{- tpl (toYaml .) $root | nindent 2 }}
  {{- end }}
{{- end }}

{{/* Pod annotations: a config checksum (so a config change rolls the pods) and optional scrape hints. */}}
{{- define "booking-service.podAnnotations" -}}
checksum/config: {{ include "booking-service.configData" .root | sha256sum }}
{{- if and .longRunning .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .root.Values.config.metricsPort | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .root.Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

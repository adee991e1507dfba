{{/*
A Deployment of one long-running role. Arguments (dict): root, component, args, spec,
autoscaled (true: no replicas field, an HPA or KEDA owns it).
*/}}
{{- define "booking-service.deployment" -}}
{{- $root := .root }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "booking-service.fullname" $root }}-{{ .component }}
  labels:
    {{- include "booking-service.componentLabels" . | nindent 4 }}
spec:
  {{- if not .autoscaled }}
  replicas: {{ .spec.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "booking-service.selectorLabels" . | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      # Start the new pod before stopping an old one: a worker stops only after its replacement is ready.
      maxSurge: 1
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "booking-service.selectorLabels" . | nindent 8 }}
        {{- include "booking-service.metricsLabel" . | nindent 8 }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- include "booking-service.podAnnotations" (dict "root" $root "longRunning" true) | nindent 8 }}
    spec:
      {{- include "booking-service.podSpec" (dict "root" $root "component" .component "args" .args "spec" .spec "longRunning" true) | nindent 6 }}
{{- end }}

{{/* A PodDisruptionBudget for one role, when enabled. */}}
{{- define "booking-service.pdb" -}}
{{- if .spec.podDisruptionBudget.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "booking-service.fullname" .root }}-{{ .component }}
  labels:
    {{- include "booking-service.componentLabels" . | nindent 4 }}
spec:
  {{- if hasKey .spec.podDisruptionBudget "minAvailable" }}
  minAvailable: {{ .spec.podDisruptionBudget.minAvailable }}
  {{- else }}
  maxUnavailable: {{ .spec.podDisruptionBudget.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "booking-service.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

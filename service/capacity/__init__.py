"""The capacity domain: policy, quoting, hold metadata and drift, as pure functions over values.

Nothing in the domain modules (errors, policy, quoting, holds, drift) reads a clock, a database
or a broker: callers pass ``now`` and the data in, and get values or a
:class:`~service.capacity.errors.CapacityError` back. They are not re-exported here, so importing
one does not import the others; import from the module that defines a name.

- :mod:`service.capacity.errors` -- ``CapacityError`` and the error codes.
- :mod:`service.capacity.policy` -- the policy models, ``policy_version``, ``adjacency_hash``,
  ``service_window``.
- :mod:`service.capacity.quoting` -- ``quote`` over ``Occupancy`` values.
- :mod:`service.capacity.holds` -- hold metadata, ``build_hold_metadata`` and its validator.
- :mod:`service.capacity.drift` -- ``diff_policies``, ``diff_snapshot``, ``summarize``.
"""

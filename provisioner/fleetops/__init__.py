"""The fleet operations engine: ask provisioned nodes, through their overlays, to act.

=========================  ==========================================================
module                     holds
=========================  ==========================================================
``model``                  jobs, targets, their states; the ``fleetops`` config section
``store``                  the ``PROVISIONER_JOBS`` KV bucket, compare-and-set updates
``kinds``                  the job kinds (``reprovision``, ``renew``) and their registry
``drain``                  the ``drain`` kind: move a draining overlay's nodes out
``shutdown``               the ``revoke_shutdown`` kind: stop a revoked node
``overlay_client``         connections to overlay brokers with the overlay's client identity
``runner``                 the executor: leader only, paced, retried, resumable
``plan``                   target checks and the dry run
``metrics``                the engine's Prometheus series
``engine``                 :class:`FleetOps`, what the service and the admin API use
=========================  ==========================================================

See ``docs/lifecycle.md`` ("The fleet operations engine"). Import from the modules
(``provisioner.fleetops.engine`` ...): ``provisioner.config`` imports
``provisioner.fleetops.model``, so this ``__init__`` imports nothing.
"""

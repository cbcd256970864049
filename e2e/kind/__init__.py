"""The e2e scenarios on a kind cluster with Knative and Kourier or Istio.

``plan.py`` says what a cluster needs (a list of steps, built by a pure
function, printed by ``pytest e2e --e2e-plan kourier``); ``cluster.py`` runs it
with pytest-kind; ``backend.py`` is the :class:`backend.Backend` the scenarios
use; ``switches.py`` holds the kind-only changes some scenarios make and undo;
``hooks.py`` is what ``e2e/conftest.py`` calls.
"""

"""Injected API errors on a real API server: a validating admission webhook that refuses on demand.

kmock's emulator can answer any request with an error; a real API server
cannot be told to. An admission webhook can: a refusal carries the status
code the webhook chooses, and the client sees exactly that (409 Conflict, 500,
...). The webhook runs on 127.0.0.1 in its own thread and allows everything
except the refusals armed with :meth:`FaultWebhook.fail_next`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import threading
import time
from http import HTTPStatus
from typing import Any

from aiohttp import web

from async_component.local.ports import free_port

from kube.controlplane import ControlPlane

CONFIG_NAME = "async-component-test-faults"
WEBHOOK_NAME = "faults.async-component.test"
RULES = [{"apiGroups": ["", "networking.internal.knative.dev"], "apiVersions": ["*"],
          "operations": ["CREATE", "UPDATE"], "resources": ["services", "ingresses", "ingresses/status"],
          "scope": "Namespaced"}]


@dataclasses.dataclass
class Fault:
    operation: str  # CREATE or UPDATE (a PATCH is an UPDATE to admission)
    resource: str  # plural, with /status for the subresource
    namespace: str
    status: int
    user: str | None


class FaultWebhook:
    """``with FaultWebhook(control_plane):`` registers the webhook and waits until the API server calls it."""

    def __init__(self, control_plane: ControlPlane) -> None:
        self.control_plane = control_plane
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fault-webhook", daemon=True)
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._runner: web.AppRunner | None = None
        self.seen = 0

    def fail_next(self, operation: str, resource: str, namespace: str, *, times: int = 1, status: int = 500,
                  user: str | None = None) -> None:
        """Refuse the next ``times`` matching writes (by ``user`` only, when given) with ``status``."""
        with self._lock:
            self._faults += [Fault(operation.upper(), resource, namespace, status, user)] * times

    def _take(self, request: dict[str, Any]) -> Fault | None:
        resource = request["resource"]["resource"] + (f"/{request['subResource']}" if request.get("subResource") else "")
        with self._lock:
            self.seen += 1
            for fault in self._faults:
                if (fault.operation, fault.resource, fault.namespace) == (request["operation"], resource,
                                                                          request.get("namespace")) \
                        and fault.user in (None, request["userInfo"]["username"]):
                    self._faults.remove(fault)
                    return fault
        return None

    async def _review(self, http_request: web.Request) -> web.Response:
        review = await http_request.json()
        request = review["request"]
        fault = self._take(request)
        response: dict[str, Any] = {"uid": request["uid"], "allowed": fault is None}
        if fault is not None:
            reason = HTTPStatus(fault.status).phrase.replace(" ", "")
            response["status"] = {"code": fault.status, "reason": reason, "message": "injected by the test"}
        return web.json_response({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                                  "response": response})

    async def _serve(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*map(str, self.control_plane.serving_cert()))
        app = web.Application()
        app.router.add_post("/", self._review)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=context).start()

    def __enter__(self) -> FaultWebhook:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)
        self.control_plane.apply([{
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": CONFIG_NAME},
            "webhooks": [{
                "name": WEBHOOK_NAME, "rules": RULES, "failurePolicy": "Ignore", "sideEffects": "None",
                "admissionReviewVersions": ["v1"], "timeoutSeconds": 5,
                "clientConfig": {"url": f"https://127.0.0.1:{self.port}/", "caBundle": self.control_plane.ca_bundle()},
            }],
        }])
        self._wait_until_called()
        return self

    def _wait_until_called(self, timeout: float = 30) -> None:
        """The API server picks a new webhook up from its informer a moment later; dry-run writes tell when."""
        probe = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "fault-webhook-probe", "namespace": "default"},
                 "spec": {"type": "ExternalName", "externalName": "probe.invalid"}}
        deadline = time.monotonic() + timeout
        while self.seen == 0:
            self.control_plane.request("POST", "/api/v1/namespaces/default/services?dryRun=All", probe)
            if time.monotonic() > deadline:
                raise RuntimeError("the API server never called the fault webhook")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        try:
            self.control_plane.kubectl("delete", "validatingwebhookconfiguration", CONFIG_NAME,
                                       "--ignore-not-found", check=False)
        finally:
            if self._runner is not None:
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

"""Controller benchmark on a real control plane: 200 async Ingresses created at once.

Two figures, each from the moment the first request leaves:
1. until every parent has both children (the child Ingress and the -async Service);
2. after every child is then marked Ready (what Kourier does once Envoy serves
   it), until every parent is Ready.

It starts etcd, kube-apiserver and kube-controller-manager (e2e/kube/, built on
first use), installs Knative Serving's CRDs and the controller's RBAC, runs
``async-component controller`` as the async-controller ServiceAccount, and
prints a markdown table (also written to perf/results/kube-bench-<UTC>/).

    python perf/kube_bench.py [--count 200]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "e2e"))

from async_component.controller import resources as r  # noqa: E402
from async_component.controller.kubeapi import INGRESSES, KubeApi  # noqa: E402
from async_component.local.ports import free_port  # noqa: E402
from kind.versions import load  # noqa: E402
from kube import build, install  # noqa: E402
from kube.controlplane import ControlPlane  # noqa: E402

import machine  # noqa: E402

NAMESPACE = "bench"
POLL = 0.2


def parent(name: str) -> dict:
    path = {"splits": [{"serviceName": f"{name}-00001", "serviceNamespace": NAMESPACE, "servicePort": 80,
                        "percent": 100}]}
    return {"apiVersion": r.INGRESS_API_VERSION, "kind": "Ingress",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "annotations": {r.INGRESS_CLASS_ANNOTATION: r.ASYNC_INGRESS_CLASS}},
            "spec": {"rules": [{"hosts": [f"{name}.{NAMESPACE}.example.com"], "visibility": r.VISIBILITY_EXTERNAL,
                                "http": {"paths": [path]}}]}}


def listed(cp: ControlPlane, path: str) -> list[dict]:
    return cp.request("GET", path, timeout=60)["items"]


async def wait_until(check, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise SystemExit(f"kube bench: {what} not reached in {timeout:.0f}s")
        await asyncio.sleep(POLL)


def ready(obj: dict) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


async def run(cp: ControlPlane, count: int) -> dict[str, float]:
    names = [f"svc-{i:03d}" for i in range(count)]
    ingresses = f"/apis/{INGRESSES.group}/{INGRESSES.version}/namespaces/{NAMESPACE}/ingresses"
    services = f"/api/v1/namespaces/{NAMESPACE}/services?labelSelector={r.PARENT_LABEL}"
    api = KubeApi(cp_info(cp))
    try:
        started = time.monotonic()
        await asyncio.gather(*(api.create(INGRESSES, parent(name)) for name in names))
        created = time.monotonic() - started

        def all_children() -> bool:
            children = [i for i in listed(cp, ingresses) if r.PARENT_LABEL in i["metadata"].get("labels", {})]
            return len(children) == count and len(listed(cp, services)) == count

        await wait_until(all_children, f"{count} child Ingresses and Services", 600)
        children_done = time.monotonic() - started

        children = [i for i in listed(cp, ingresses) if r.PARENT_LABEL in i["metadata"].get("labels", {})]
        marked = time.monotonic()
        await asyncio.gather(*(api.patch(INGRESSES, NAMESPACE, child["metadata"]["name"], {"status": {
            "observedGeneration": child["metadata"]["generation"],
            "conditions": [{"type": t, "status": "True"} for t in ("LoadBalancerReady", "NetworkConfigured", "Ready")],
            "publicLoadBalancer": {"ingress": [{"domainInternal": "kourier.kourier-system.svc.cluster.local"}]},
            "privateLoadBalancer": {"ingress": [{"domainInternal": "kourier-internal.kourier-system.svc.cluster.local"}]},
        }}, subresource="status") for child in children))
        marked_done = time.monotonic() - marked

        def all_ready() -> bool:
            parents = [i for i in listed(cp, ingresses) if i["metadata"]["name"] in set(names)]
            return sum(map(ready, parents)) == count

        await wait_until(all_ready, f"{count} Ready parents", 600)
        ready_done = time.monotonic() - marked
    finally:
        await api.close()
    return {"create_all_s": created, "all_children_s": children_done, "mark_children_ready_s": marked_done,
            "all_parents_ready_s": ready_done}


def wait_until_leading(health_url: str, log: Path, timeout: float = 120) -> None:
    """The clock starts once the controller holds its Lease, not while it imports or stands by."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(health_url, timeout=1) as resp:
                if json.loads(resp.read()).get("state") == "leading":
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise SystemExit(f"kube bench: the controller never led:\n{log.read_text(errors='replace')[-3000:]}")


def cp_info(cp: ControlPlane):
    import kopf

    return kopf.ConnectionInfo(server=cp.url, ca_path=str(cp.ca_file), scheme="Bearer", token=cp.admin_token)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="async Ingresses created at once (default 200)")
    args = parser.parse_args()
    versions = load()
    binaries = build.ensure(versions)
    load_before = machine.load()
    crds = install.crds_for(versions)
    with tempfile.TemporaryDirectory(prefix="kube-bench-") as tmp, ControlPlane(binaries, Path(tmp), crds=crds) as cp:
        install.prepare(cp)
        cp.ensure_namespace(NAMESPACE)
        kubeconfig = install.controller_kubeconfig(cp, Path(tmp) / "controller.kubeconfig")
        health = free_port()
        env = dict(os.environ, KUBECONFIG=str(kubeconfig), HEALTH_PORT=str(health),
                   SYSTEM_NAMESPACE="knative-serving", LOG_LEVEL="WARNING")
        with (Path(tmp) / "controller.log").open("wb") as log:
            controller = subprocess.Popen([sys.executable, "-m", "async_component", "controller"], env=env,
                                          stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_leading(f"http://127.0.0.1:{health}/healthz", Path(tmp) / "controller.log")
            results = asyncio.run(run(cp, args.count))
        finally:
            controller.terminate()
            controller.wait(15)
    results.update(count=args.count, kubernetes=versions.kubernetes, etcd=versions.etcd,
                   load_before=load_before, load_after=machine.load(), cpu=machine.cpu_model(),
                   commit=machine.commit())
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "perf" / "results" / f"kube-bench-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    table = "\n".join([
        f"| {args.count} async Ingresses, Kubernetes {versions.kubernetes} | seconds |", "|---|---|",
        f"| all created (POSTs answered) | {results['create_all_s']:.1f} |",
        f"| every parent has its child Ingress and Service | {results['all_children_s']:.1f} |",
        f"| all children marked Ready (status PATCHes answered) | {results['mark_children_ready_s']:.1f} |",
        f"| then every parent Ready | {results['all_parents_ready_s']:.1f} |",
        f"\n{results['cpu']}, commit {results['commit']}; load before {load_before}, after {results['load_after']}",
    ])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"kube bench: written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

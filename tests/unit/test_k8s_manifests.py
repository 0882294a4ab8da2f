"""deploy/k8s offline: render the kustomize base and the GPU overlay, validate every object against the
Kubernetes schemas (kubernetes-validate, strict: an unknown field fails too), and check that the pieces agree
with each other and with tandem's flags.

There is no kustomize binary here (nor on PyPI), so `render` implements the subset the manifests use:
`resources` (files and folders), `patches` (strategic merge by kind and name, lists merged by their
Kubernetes merge key where the manifests patch one, replaced whole otherwise) and `images` (what
`kustomize edit set image` writes). Any other kustomization field fails the test rather than being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from common.curve import CurveKeys, ServerCurve, keygen
from gateway.discovery import parse_host_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
OVERLAYS = ["base", "gpu"]
K8S_VERSION = "1.33.0"  # the schemas every object must satisfy; kubernetes-validate is pinned in pyproject.toml
SUPPORTED = {"apiVersion", "kind", "resources", "patches", "images"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name"}

Object = dict[str, Any]


# -- the kustomize subset -----------------------------------------------------------------------


def load_all(path: Path) -> list[Object]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def merge(base: Object, patch: Object) -> None:
    """Strategic merge, as far as these manifests need it: maps recurse, keyed lists merge item by item."""
    for key, value in patch.items():
        assert not key.startswith("$"), f"patch directive {key} is outside this test's kustomize subset"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(base.get(key), list):
            by_key = {item[MERGE_KEYS[key]]: item for item in base[key]}
            for item in value:
                if item[MERGE_KEYS[key]] in by_key:
                    merge(by_key[item[MERGE_KEYS[key]]], item)
                else:
                    base[key].append(item)
        else:
            base[key] = value


def render(directory: Path) -> list[Object]:
    kustomization = load_all(directory / "kustomization.yaml")[0]
    assert kustomization.keys() <= SUPPORTED, f"extend this test's kustomize subset: {kustomization.keys() - SUPPORTED}"
    objects: list[Object] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else load_all(path)
    for entry in kustomization.get("patches", []):
        assert entry.keys() == {"path"}, f"only `path:` patches are in this test's kustomize subset: {entry}"
        for patch in load_all(directory / entry["path"]):
            targets = [o for o in objects if (o["kind"], name(o)) == (patch["kind"], name(patch))]
            assert len(targets) == 1, f"patch {entry['path']} matches {len(targets)} objects"
            merge(targets[0], patch)
    for image in kustomization.get("images", []):
        set_image(objects, image)
    return objects


def set_image(objects: list[Object], image: dict[str, str]) -> None:
    """An `images:` entry: containers running image `name` get `newName`, `newTag` or `digest`; what the entry
    leaves out (the tag, say) stays as it was."""
    assert image.keys() <= {"name", "newName", "newTag", "digest"}, image
    for obj in objects:
        for item in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            reference, _, tag = item["image"].split("@")[0].rpartition(":")
            if not reference or "/" in tag:  # no tag; that colon was a registry's port
                reference, tag = item["image"].split("@")[0], "latest"
            if reference == image["name"]:
                reference = image.get("newName", reference)
                tag = image.get("newTag", tag)
                item["image"] = f"{reference}@{image['digest']}" if "digest" in image else f"{reference}:{tag}"


def name(obj: Object) -> str:
    return str(obj["metadata"]["name"])


def find(objects: list[Object], kind: str, name_: str | None = None) -> Object:
    found = [o for o in objects if o["kind"] == kind and (name_ is None or name(o) == name_)]
    assert len(found) == 1, f"{len(found)} {kind} {name_ or ''}"
    return found[0]


def container(workload: Object) -> Object:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def flags(workload: Object, flag: str) -> list[str]:
    return [arg.split("=", 1)[1] for arg in container(workload)["args"] if arg.startswith(f"--{flag}=")]


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_kubernetes(overlay: str) -> None:
    objects = render(DEPLOY / overlay)
    assert len(objects) == 5
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']} {name(obj)}: {exc.message} at {'.'.join(map(str, exc.path))}")
    assert not errors, "\n".join(errors)


def test_a_schema_error_fails_validation() -> None:
    """The check above can fail: a misspelt field and a wrong type are both caught."""
    worker = find(render(DEPLOY / "base"), "StatefulSet")
    worker["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["tcpSocket"]["prot"] = 5555
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSION, strict=True)
    worker = find(render(DEPLOY / "base"), "StatefulSet")
    worker["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_finds_every_worker_through_the_headless_service(overlay: str) -> None:
    """One --worker-dns flag naming the workers' headless Service and its port, and no fixed list beside it: so
    any number of replicas is found, and pods published before they are ready are connected early."""
    objects = render(DEPLOY / overlay)
    workers = find(objects, "StatefulSet")
    headless = find(objects, "Service", workers["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"].items() <= workers["spec"]["template"]["metadata"]["labels"].items()
    port = headless["spec"]["ports"][0]["port"]
    assert flags(workers, "bind") == [f"tcp://0.0.0.0:{port}"]
    gateway = find(objects, "Deployment")
    assert flags(gateway, "worker-dns") == [f"{name(headless)}:{port}"]
    assert flags(gateway, "worker") == []
    parse_host_port(flags(gateway, "worker-dns")[0])  # what the gateway itself accepts


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateways_are_probed_on_the_health_routes_and_served_and_scaled(overlay: str) -> None:
    objects = render(DEPLOY / overlay)
    gateway = find(objects, "Deployment")
    assert container(gateway)["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container(gateway)["livenessProbe"]["httpGet"]["path"] == "/health/live"
    service = find(objects, "Service", "tandem")
    assert service["spec"]["selector"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    assert find(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == name(gateway)
    grace = float(flags(gateway, "shutdown-grace")[0])
    assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace  # drain before SIGKILL


def test_an_overlay_that_sets_the_image_renders_valid_objects(tmp_path: Path) -> None:
    """What `kustomize edit set image tandem=registry.example.com/tandem:0.1.0` (README) makes of an overlay."""
    image = {"name": "tandem", "newName": "registry.example.com/tandem", "newTag": "0.1.0"}
    kustomization = {"resources": [str(DEPLOY / "gpu")], "images": [image]}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    objects = render(tmp_path)
    images = {container(o)["image"] for o in objects if o["kind"] in ("StatefulSet", "Deployment")}
    assert images == {"registry.example.com/tandem:0.1.0"}
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_gpu_overlay_gives_each_worker_a_gpu_and_keeps_the_rest() -> None:
    base, gpu = (find(render(DEPLOY / overlay), "StatefulSet") for overlay in OVERLAYS)
    worker = container(gpu)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in container(base)["resources"]["limits"]
    env = {item["name"]: item["value"] for item in worker["env"]}
    assert env["TANDEM_DEVICE"] == "cuda" and env["TANDEM_CACHE_DIR"] == "/cache/tandem"  # added, base kept
    assert worker["args"] == container(base)["args"] and worker["volumeMounts"] == container(base)["volumeMounts"]
    assert gpu["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    claim = gpu["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "model-cache" and claim["spec"]["resources"]["requests"]["storage"] == "100Gi"


def project_secret(workload: Object, secret: dict[str, bytes], root: Path) -> Path:
    """Write the tandem-curve Secret's items where `workload`'s volume mounts put them, under `root`."""
    volumes = {volume["name"]: volume for volume in workload["spec"]["template"]["spec"]["volumes"]}
    for mount in container(workload)["volumeMounts"]:
        source = volumes.get(mount["name"], {}).get("secret")
        if source and source["secretName"] == "tandem-curve":
            for item in source["items"]:
                target = root / mount["mountPath"].lstrip("/") / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(secret[item["key"]])
    return root


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_curve_keys_from_the_secret_are_where_the_flags_look(overlay: str, tmp_path: Path) -> None:
    """Make the Secret as README says (`keygen`, then `--from-file` of the folder: its top-level files), project
    it as each pod's volume does, and load the keys from the paths the flags name."""
    keygen(tmp_path / "curve")
    secret = {path.name: path.read_bytes() for path in (tmp_path / "curve").iterdir() if path.is_file()}
    objects = render(DEPLOY / overlay)
    worker, gateway = find(objects, "StatefulSet"), find(objects, "Deployment")
    in_worker = project_secret(worker, secret, tmp_path / "worker")
    in_gateway = project_secret(gateway, secret, tmp_path / "gateway")

    def key(root: Path, workload: Object, flag: str) -> Path:
        return root / flags(workload, flag)[0].lstrip("/")

    server = ServerCurve.load(
        key(in_worker, worker, "curve-secret-key"), key(in_worker, worker, "curve-authorized-dir")
    )
    client = CurveKeys.load(key(in_gateway, gateway, "curve-server-key"), key(in_gateway, gateway, "curve-client-key"))
    assert client.server_public == server.public  # the gateway trusts this worker's key
    assert client.public in server.authorized  # and the worker lets this gateway in

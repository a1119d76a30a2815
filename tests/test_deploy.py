"""deploy/: the KubeRay manifests, rendered by the real `kubectl kustomize`, validate against the
official CRD schemas with unknown fields rejected, and fit together: Secrets, the spec's
ConfigMap and mount path, GPUs, the image and the Ray version."""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from raymerge.sweep.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
RAY_VERSION = re.search(r'"ray\[default\]==([\d.]+)"', (ROOT / "pyproject.toml").read_text())[1]

KUBECTL = shutil.which("kubectl")

pytestmark = [
    pytest.mark.skipif(not SCHEMAS.is_dir(), reason="../shared/k8s-schemas is absent"),
    pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its kustomize) is not installed"),
]


def render(folder: Path) -> list[dict]:
    """What `kubectl apply -k folder` would apply."""
    result = subprocess.run(
        [KUBECTL, "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _strict(schema):
    """The CRDs allow unknown fields; close every object that lists its properties."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@functools.cache
def _validator(kind: str):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are large
    crd = yaml.load((SCHEMAS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def rendered():
    return {(d["kind"], d["metadata"]["name"]): d for d in render(DEPLOY / "k8s")}


@pytest.fixture(scope="module")
def secrets():
    docs = yaml.safe_load_all((DEPLOY / "k8s" / "secrets.example.yaml").read_text())
    return {d["metadata"]["name"]: d for d in docs if d}


def _clusters(rendered):
    """(name, RayCluster spec) for the long-lived cluster and the RayJob's cluster."""
    yield "RayCluster", rendered["RayCluster", "raymerge"]["spec"]
    yield "RayJob", rendered["RayJob", "raymerge-sweep"]["spec"]["rayClusterSpec"]


def _containers(cluster):
    yield from cluster["headGroupSpec"]["template"]["spec"]["containers"]
    for group in cluster["workerGroupSpecs"]:
        yield from group["template"]["spec"]["containers"]


def test_everything_renders(rendered):
    assert set(rendered) == {
        ("RayCluster", "raymerge"),
        ("RayJob", "raymerge-sweep"),
        ("ConfigMap", "raymerge-sweep"),
    }
    for kind, _ in rendered:
        assert kind == "ConfigMap" or rendered[kind, _]["apiVersion"] == "ray.io/v1"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_manifests_validate_against_the_kuberay_crds(rendered, kind):
    [doc] = [d for (k, _), d in rendered.items() if k == kind]
    errors = sorted(_validator(kind).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_strict_schema_rejects_a_misspelt_field(rendered):
    doc = copy.deepcopy(rendered["RayJob", "raymerge-sweep"])
    doc["spec"]["shutdownAfterJobFinish"] = True  # missing s
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replica"] = 2
    messages = [e.message for e in _validator("RayJob").iter_errors(doc)]
    assert any("shutdownAfterJobFinish" in m for m in messages)
    assert any("'replica'" in m for m in messages)


def test_head_gpu_workers_and_token_auth(rendered, secrets):
    for name, cluster in _clusters(rendered):
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", name
        assert cluster["rayVersion"] == RAY_VERSION, name
        assert cluster["authOptions"]["mode"] == "token", name
        assert cluster["authOptions"]["secretName"] in secrets, name
        assert "auth_token" in secrets[cluster["authOptions"]["secretName"]]["stringData"]
        [group] = cluster["workerGroupSpecs"]
        pod = group["template"]["spec"]
        gpus = pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) >= 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]


def test_credentials_come_from_secrets_never_inline(rendered, secrets):
    for name, cluster in _clusters(rendered):
        for container in _containers(cluster):
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
            assert refs and all(ref in secrets for ref in refs), (name, container["name"])
            for variable in container.get("env", []):
                assert "value" not in variable or not re.search(
                    "KEY|SECRET|TOKEN|PASSWORD", variable["name"]
                ), variable
    text = "\n".join(yaml.safe_dump(d) for d in rendered.values())
    assert "REPLACE_ME" not in text  # the example Secrets are never part of what is applied


def test_the_job_runs_the_spec_the_configmap_mounts(rendered):
    job = rendered["RayJob", "raymerge-sweep"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    spec_path = Path(job["entrypoint"].split()[-1])
    assert job["entrypoint"].startswith("python -m raymerge run ")
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    [mount] = [
        m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == str(spec_path.parent)
    ]
    [volume] = [v for v in head["volumes"] if v["name"] == mount["name"]]
    configmap = rendered["ConfigMap", volume["configMap"]["name"]]
    spec = parse_spec(yaml.safe_load(configmap["data"][spec_path.name]))
    [group] = job["rayClusterSpec"]["workerGroupSpecs"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert spec.workers * spec.gpus_per_worker <= group["replicas"] * gpus  # the workers fit
    assert all(loc.startswith("s3://") for loc in [spec.base_model, *spec.adapters.values()])


def test_image_and_dockerfile_carry_the_pinned_ray_version(rendered):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE)
    assert base == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    images = {c["image"] for _, cluster in _clusters(rendered) for c in _containers(cluster)}
    [image] = images
    assert image.endswith(f"-ray{RAY_VERSION}")

"""The cluster files in configs/cluster/ stay valid against what consumes them.

`ray-cluster.yaml` is checked against the JSON schema that Ray's cluster launcher itself
validates with (shipped inside the installed ray package). `rayjob.yaml` is checked
against the fields of KubeRay's RayJob CRD (ray.io/v1) that it uses: each mapping's keys
must be fields the CRD (or the Kubernetes pod spec) defines, and the required ones must
be there.
"""

from __future__ import annotations

import json
import pathlib

import jsonschema
import pytest
import ray
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "configs" / "cluster"

# Field names from KubeRay's RayJob / RayCluster CRD (ray.io/v1) for the levels we use.
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}
RAYCLUSTER_SPEC = {
    "autoscalerOptions", "enableInTreeAutoscaling", "headGroupSpec", "headServiceAnnotations",
    "rayVersion", "suspend", "workerGroupSpecs",
}
HEAD_GROUP = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_GROUP = {
    "groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts",
    "rayStartParams", "replicas", "scaleStrategy", "suspend", "template",
}


def _load_all(path: pathlib.Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_ray_cluster_yaml_matches_ray_launcher_schema():
    schema_path = pathlib.Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2, "every node must start with token auth"
    assert start.count("--metrics-export-port") == 2
    assert "--dashboard-host=127.0.0.1" in start


def test_ray_cluster_yaml_rejects_a_broken_copy():
    # The schema check above can fail: a node type without resources is refused.
    schema_path = pathlib.Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    del config["available_node_types"]["head"]["resources"]
    with pytest.raises(jsonschema.ValidationError, match="'resources' is a required property"):
        jsonschema.validate(config, schema)


def test_rayjob_uses_only_crd_fields():
    docs = _load_all(CLUSTER / "rayjob.yaml")
    kinds = [d["kind"] for d in docs]
    assert kinds == ["PersistentVolumeClaim", "RayJob"]
    job = docs[1]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert spec["entrypoint"].startswith("rlfleet run configs/")
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC, set(cluster) - RAYCLUSTER_SPEC
    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_GROUP and {"rayStartParams", "template"} <= set(head)
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, set(group) - WORKER_GROUP
        assert {"groupName", "rayStartParams", "template"} <= set(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # Every Ray container runs with token auth from the same secret.
    containers = [c for c in head["template"]["spec"]["containers"]]
    for group in cluster["workerGroupSpecs"]:
        containers += group["template"]["spec"]["containers"]
    for c in containers:
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "rlfleet-ray-token"
    # The buffer volume is the claim this file creates.
    volumes = head["template"]["spec"]["volumes"]
    assert volumes[0]["persistentVolumeClaim"]["claimName"] == docs[0]["metadata"]["name"]


def test_rayjob_entrypoint_config_exists():
    job = _load_all(CLUSTER / "rayjob.yaml")[1]
    config_path = job["spec"]["entrypoint"].split()[2]
    assert (ROOT / config_path).is_file(), config_path

"""The cluster manifests in docker/ agree with the code they run.

Parsed with PyYAML (no Kubernetes or AWS here): image tags follow pyproject's version,
the Ray version is the installed ray's, the RayJob's entrypoint parses with the real CLI
parser and names an existing preset, its experiment URI opens with the real storage
class, every worker shape hosts the actors the stages request (cluster/resources.py),
and token authentication is configured on every Ray process.
"""

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

from attribution.presets import available_presets, load_preset, parse_override
from cluster import resources
from cluster.cli import build_parser
from cluster.storage import ExperimentStorage, is_uri

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE_NAME = "image-attribution"
GIB = 2**30


def manifests() -> dict[str, list[dict]]:
    found = {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d] for path in sorted(DOCKER.glob("*.yaml"))}
    assert found, "no YAML manifests in docker/"
    return found


def by_kind(kind: str) -> list[tuple[str, dict]]:
    return [(name, doc) for name, docs in manifests().items() for doc in docs if doc.get("kind") == kind]


def launcher_configs() -> list[tuple[str, dict]]:
    return [(name, doc) for name, docs in manifests().items() for doc in docs if "available_node_types" in doc]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"{name} (RayCluster)", doc["spec"]) for name, doc in by_kind("RayCluster")]
    specs += [(f"{name} (RayJob)", doc["spec"]["rayClusterSpec"]) for name, doc in by_kind("RayJob")]
    return specs


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(group name, group spec) for the head and every worker group."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the first container runs Ray


def quantity(value) -> float:
    """A Kubernetes quantity ("14", "500m", "56Gi") as a number (bytes for memory)."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def k8s_shape(group: dict) -> dict:
    """What Ray sees on one pod of the group: CPUs, GPUs (from the limits unless
    rayStartParams overrides), memory in bytes."""
    limits = ray_container(group)["resources"]["limits"]
    params = group.get("rayStartParams") or {}
    return {"CPU": float(params.get("num-cpus", quantity(limits["cpu"]))),
            "GPU": float(params.get("num-gpus", quantity(limits.get("nvidia.com/gpu", 0)))),
            "memory": quantity(limits["memory"])}


def image_variant(image: str) -> str:
    """'cpu' or 'gpu' from REGISTRY/image-attribution:VERSION-VARIANT (asserting the scheme)."""
    reference = image.rsplit("/", 1)[-1]
    name, _, tag = reference.partition(":")
    assert name == IMAGE_NAME, f"image {image!r} is not {IMAGE_NAME}"
    match = re.fullmatch(rf"{re.escape(VERSION)}-(cpu|gpu)", tag)
    assert match, f"image {image!r}: tag should be {VERSION}-cpu or {VERSION}-gpu (pyproject.toml's version)"
    return match.group(1)


def rayjob_entrypoints() -> list[tuple[str, str]]:
    return [(name, doc["spec"]["entrypoint"]) for name, doc in by_kind("RayJob")]


def entrypoint_args(entrypoint: str):
    argv = shlex.split(entrypoint)
    assert argv[0] == "attribution", f"entrypoint should run the attribution command, got {argv[0]!r}"
    return build_parser().parse_args(argv[1:])


def preset_of(args) -> dict:
    return load_preset(args.preset, dict(parse_override(o) for o in args.overrides))


def served_preset() -> dict:
    """The preset the manifests are sized for: the RayJob's (the imagenet preset)."""
    entrypoints = rayjob_entrypoints()
    assert entrypoints, "docker/ has no RayJob"
    return preset_of(entrypoint_args(entrypoints[0][1]))


# ----------------------------------------------------------------------------- all manifests


def test_manifests_present():
    assert ray_cluster_specs(), "no KubeRay RayCluster / RayJob manifest"
    assert by_kind("RayJob"), "no KubeRay RayJob manifest"
    assert launcher_configs(), "no Ray cluster-launcher manifest"


def test_ray_version_is_the_installed_one():
    for where, spec in ray_cluster_specs():
        assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion {spec['rayVersion']} != ray {ray.__version__}"
    for name, config in launcher_configs():
        checks = " ".join(config.get("setup_commands", []))
        for found in re.findall(r"ray\.__version__ == '([^']+)'", checks):
            assert found == ray.__version__, f"{name}: setup_commands expect ray {found}, installed {ray.__version__}"
        for found in re.findall(r"attribution\.__version__ == '([^']+)'", checks):
            assert found == VERSION, f"{name}: setup_commands expect the project at {found}, pyproject has {VERSION}"


# ----------------------------------------------------------------------------- KubeRay


def test_kuberay_images_follow_the_tag_scheme_and_gpus():
    for where, spec in ray_cluster_specs():
        for group_name, group in groups(spec):
            variant = image_variant(ray_container(group)["image"])
            has_gpu = k8s_shape(group)["GPU"] > 0
            assert (variant == "gpu") == has_gpu, (
                f"{where}, group {group_name}: {variant} image on a pod with {k8s_shape(group)['GPU']} GPUs")
    for name, doc in by_kind("RayJob"):
        submitter = doc["spec"].get("submitterPodTemplate")
        if submitter:
            image_variant(submitter["spec"]["containers"][0]["image"])


def test_kuberay_requests_equal_limits():
    # Ray sizes itself from the limits; a request below them lets Kubernetes overcommit the node.
    for where, spec in ray_cluster_specs():
        for group_name, group in groups(spec):
            res = ray_container(group)["resources"]
            for key in ("cpu", "memory", "nvidia.com/gpu"):
                if key in res.get("limits", {}) or key in res.get("requests", {}):
                    assert quantity(res["limits"][key]) == quantity(res["requests"][key]), (
                        f"{where}, group {group_name}: {key} request {res['requests'].get(key)} != limit "
                        f"{res['limits'].get(key)}")


def check_node_shape(where: str, shape: dict, preset: dict, worker: bool) -> None:
    """One node (pod or instance) can host what the stages put on it."""
    gpus = shape["GPU"]
    if gpus:
        assert gpus == int(gpus), f"{where}: {gpus} GPUs; GPU nodes expose whole GPUs"
        assert gpus >= resources.EMBED_ACTOR_GPUS and gpus >= resources.LARGE_MODEL_GPU_SHARE, (
            f"{where}: {gpus} GPUs cannot host an embedding actor ({resources.EMBED_ACTOR_GPUS} GPU)")
        need = resources.gpu_node_min_cpus(int(gpus))
        assert shape["CPU"] >= need, (
            f"{where}: {shape['CPU']:g} CPUs for {gpus:g} GPUs; the stages need {need} (retraining actors at "
            f"{resources.SMALL_MODEL_GPU_SHARE} GPU x {resources.ACTOR_CPUS} CPU each, plus the job driver)")
    elif worker:
        assert shape["CPU"] >= resources.ACTOR_CPUS, f"{where}: a worker without CPUs hosts no actor"
    if "memory" in shape:
        need = resources.min_node_memory_bytes(preset)
        assert shape["memory"] >= need, (
            f"{where}: {shape['memory'] / GIB:.0f} GiB memory; the object store needs {need / GIB:.0f} GiB of node "
            f"memory to hold the {preset['name']} training embeddings "
            f"({resources.rank_object_store_bytes(preset) / GIB:.1f} GiB)")


def test_kuberay_workers_host_the_actors():
    preset = served_preset()
    for where, spec in ray_cluster_specs():
        shapes = {name: k8s_shape(group) for name, group in groups(spec)}
        assert any(s["GPU"] for s in shapes.values()), f"{where}: no GPU worker group"
        assert any(not s["GPU"] and s["CPU"] for n, s in shapes.items() if n != "head"), f"{where}: no CPU worker group"
        for name, shape in shapes.items():
            check_node_shape(f"{where}, group {name}", shape, preset, worker=name != "head")
        # cluster/ranking.py gives every rank actor a GPU share once the cluster has GPUs:
        # actors on CPU-only pods could never be placed, so those pods must not run with GPU pods.
        running = {g: k8s_shape(group) for g, group in groups(spec)[1:] if int(group.get("replicas", 0)) > 0}
        if any(s["GPU"] for s in running.values()):
            idle = [g for g, s in running.items() if not s["GPU"] and s["CPU"]]
            assert not idle, f"{where}: CPU-only groups {idle} start next to GPU groups: the rank stage would hang"


def token_env(container: dict) -> tuple[str | None, str | None]:
    env = {e["name"]: e for e in container.get("env", [])}
    mode = env.get("RAY_AUTH_MODE", {}).get("value")
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    return mode, (f"{ref['name']}/{ref['key']}" if ref else None)


def test_kuberay_token_authentication_everywhere():
    """Every Ray process and the RayJob's submitter use token mode with one shared secret
    (or the operator's authOptions, KubeRay >= 1.5.1, does it for them)."""
    for where, spec in ray_cluster_specs():
        if (spec.get("authOptions") or {}).get("mode") == "token":
            continue
        secrets = set()
        for group_name, group in groups(spec):
            mode, secret = token_env(ray_container(group))
            assert mode == "token" and secret, (
                f"{where}, group {group_name}: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a secret")
            secrets.add(secret)
        assert len(secrets) == 1, f"{where}: the groups read different token secrets {sorted(secrets)}"
    for name, doc in by_kind("RayJob"):
        spec = doc["spec"]
        if (spec["rayClusterSpec"].get("authOptions") or {}).get("mode") == "token":
            continue
        if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":
            submitter = spec.get("submitterPodTemplate")
            assert submitter, f"{name}: the default submitter pod has no token; give a submitterPodTemplate"
            mode, secret = token_env(submitter["spec"]["containers"][0])
            head_secret = token_env(ray_container(spec["rayClusterSpec"]["headGroupSpec"]))[1]
            assert mode == "token" and secret == head_secret, f"{name}: the submitter needs the cluster's token"


def test_rayjob_entrypoint_runs_a_preset_on_the_cluster(tmp_path):
    for name, entrypoint in rayjob_entrypoints():
        args = entrypoint_args(entrypoint)
        assert args.command == "run", f"{name}: entrypoint should be 'attribution run PRESET ...'"
        assert args.preset in available_presets(), (
            f"{name}: preset {args.preset!r} not in attribution/presets ({', '.join(available_presets())})")
        assert args.address == "auto", f"{name}: without --address auto the job would start its own local Ray"
        assert args.exp and is_uri(args.exp) and args.exp.startswith("s3://"), (
            f"{name}: --exp should be an s3:// URI (the cluster's pods share no disk), got {args.exp!r}")
        # The real storage class opens it offline: the ?region= spares pyarrow a region lookup.
        storage = ExperimentStorage(args.exp, staging_root=tmp_path)
        assert storage.remote and storage.local.is_dir()
        base = load_preset(args.preset)
        for override in args.overrides:
            key, _ = parse_override(override)
            section, _, field = key.rpartition(".")
            assert field in base.get(section, {}), (
                f"{name}: --set {key}: the {args.preset} preset has no such key (a typo would be silently added)")


def test_rayjob_paths_are_mounted_on_every_pod():
    for name, doc in by_kind("RayJob"):
        args = entrypoint_args(doc["spec"]["entrypoint"])
        paths = [str(v) for _, v in map(parse_override, args.overrides) if str(v).startswith("/")]
        for group_name, group in groups(doc["spec"]["rayClusterSpec"]):
            mounts = [m["mountPath"].rstrip("/") + "/" for m in ray_container(group).get("volumeMounts", [])]
            for path in paths:
                assert any(path.startswith(m) for m in mounts), (
                    f"{name}, group {group_name}: {path} is on no volume mounted in the pod (mounts: {mounts})")


# Fields of the KubeRay ray.io/v1 API (KubeRay's docs/reference/api.md). A misspelt field
# would not be rejected: the operator's structural schema drops unknown fields silently.
KUBERAY_FIELDS = {
    "RayJobSpec": {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
                   "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
                   "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
                   "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"},
    "RayClusterSpec": {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
                       "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion",
                       "workerGroupSpecs", "authOptions"},
    "HeadGroupSpec": {"template", "headService", "enableIngress", "rayStartParams", "serviceType"},
    "WorkerGroupSpec": {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                        "rayStartParams", "template", "scaleStrategy", "numOfHosts"},
}


def test_kuberay_fields_exist():
    def check(where, obj, kind):
        unknown = set(obj) - KUBERAY_FIELDS[kind]
        assert not unknown, f"{where}: {sorted(unknown)} are not {kind} fields (KubeRay would drop them silently)"

    for name, doc in by_kind("RayJob"):
        check(name, doc["spec"], "RayJobSpec")
    for where, spec in ray_cluster_specs():
        check(where, spec, "RayClusterSpec")
        check(where, spec["headGroupSpec"], "HeadGroupSpec")
        for group in spec.get("workerGroupSpecs", []):
            check(where, group, "WorkerGroupSpec")


# ----------------------------------------------------------------------------- cluster launcher


def test_launcher_config_passes_rays_schema():
    """The cluster launcher's own validation (ray up runs the same), offline."""
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    for name, config in launcher_configs():
        validate_config(prepare_config(copy.deepcopy(config)))


def launcher_image(config: dict, node_type: str) -> str:
    docker = dict(config.get("docker", {}))
    docker.update(config["available_node_types"][node_type].get("docker", {}))
    if node_type == config["head_node_type"]:
        return docker.get("head_image") or docker["image"]
    return docker.get("worker_image") or docker["image"]


def test_launcher_images_and_node_types():
    preset = served_preset()
    for name, config in launcher_configs():
        assert config["provider"]["type"] == "aws", f"{name}: expected the AWS provider"
        types = config["available_node_types"]
        assert config["head_node_type"] in types
        gpu_types = [t for t, v in types.items() if v.get("resources", {}).get("GPU")]
        assert gpu_types, f"{name}: no GPU worker type"
        for node_type, node in types.items():
            shape = {k: float(v) for k, v in node.get("resources", {}).items() if k in ("CPU", "GPU")}
            shape.setdefault("GPU", 0.0)
            assert "CPU" in shape, f"{name}, {node_type}: declare resources CPU (and GPU) for the autoscaler"
            variant = image_variant(launcher_image(config, node_type))
            assert (variant == "gpu") == bool(shape["GPU"]), f"{name}, {node_type}: {variant} image, {shape['GPU']} GPUs"
            check_node_shape(f"{name}, {node_type}", shape, preset, worker=node_type != config["head_node_type"])


def test_launcher_token_authentication():
    for name, config in launcher_configs():
        mounts = config.get("file_mounts") or {}
        assert any(remote.endswith(".ray/auth_token") for remote in mounts), (
            f"{name}: copy the cluster's token (~/.ray/auth_token) to every node with file_mounts")
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            starts = [c for c in config[key] if "ray start" in c]
            assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), (
                f"{name}: {key} must start Ray with RAY_AUTH_MODE=token")


# ----------------------------------------------------------------------------- the checks can fail


def test_checks_reject_mismatches():
    preset = served_preset()
    with pytest.raises(AssertionError, match="tag should be"):
        image_variant(f"registry.example.com/{IMAGE_NAME}:0.0.0-gpu")
    with pytest.raises(AssertionError, match="not image-attribution"):
        image_variant(f"registry.example.com/other:{VERSION}-cpu")
    # 1 GPU with 4 CPUs: the 4 small-model retraining actors fit, the driver does not
    with pytest.raises(AssertionError, match="the stages need 5"):
        check_node_shape("x", {"CPU": 4, "GPU": 1, "memory": 512 * GIB}, preset, worker=True)
    with pytest.raises(AssertionError, match="whole GPUs"):
        check_node_shape("x", {"CPU": 64, "GPU": 0.5}, preset, worker=True)
    with pytest.raises(AssertionError, match="object store needs"):
        check_node_shape("x", {"CPU": 64, "GPU": 0, "memory": 1 * GIB}, preset, worker=True)
    with pytest.raises(SystemExit):  # argparse rejects an unknown option
        entrypoint_args("attribution run imagenet --exp s3://b/x --adress auto")

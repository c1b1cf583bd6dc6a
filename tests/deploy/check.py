"""Checks of the deployment artefacts (the Helm chart, the Dockerfile, the Terraform examples) and of
the protocol's OpenAPI file.

Renders the chart with the real Helm engine for the value sets an operator uses (the command line
from the product docs, a values file written for Apono's chart, the in-cluster control plane,
existing secrets, Vault, HA, the optional objects), validates every render against the Kubernetes
schemas of the oldest and the newest Kubernetes the chart supports (kubernetes-validate --strict),
and asserts the RBAC, token and environment wiring a security reviewer and an operator rely on.
Checks the Grafana dashboard and the alert rules: each PromQL expression parses, and each metric
they use is served by a running daemon's /metrics (live_metrics.py). Keeps the chart's README in
step with values.yaml. Lints the Dockerfile with hadolint and parses
the Terraform.

Run: tests/deploy/run   (installs the tools into .venv-test, then runs this file)
"""

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import helm_python as helm
import yaml
from helm_python import _native

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "deploy", "helm", "apono-connector")
HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
# The oldest (Chart.yaml `kubeVersion`) and the newest Kubernetes the chart supports; both ship
# with kubernetes-validate (pinned in requirements.txt).
KUBE_VERSIONS = ("1.27.0", "1.37.0")
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
FAILURES = []


def check(cond, what):
    if not cond:
        FAILURES.append(what)
        print(f"FAIL {what}")


def merge(a, b):
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            merge(a[k], v)
        else:
            a[k] = v
    return a


def values(*layers):
    """REQUIRED overlaid with each layer, deep-merged; the layers are not modified."""
    out = json.loads(json.dumps(REQUIRED))
    for layer in layers:
        merge(out, json.loads(json.dumps(layer)))
    return out


def values_from_command_line(command):
    """The values a `helm upgrade ...` command line sets, parsed as a shell and Helm would."""
    args = shlex.split(command)
    out = {}
    i = 0
    while i < len(args):
        if args[i] in ("--set", "--set-string"):
            parse = helm.parse_set_string if args[i] == "--set" else helm.parse_set_string_values
            merge(out, parse(args[i + 1]))
            i += 2
        else:
            i += 1
    return out


class Render:
    """One render: the manifests as dicts, and NOTES.txt."""

    def __init__(self, docs, notes):
        self.docs = docs
        self.notes = notes

    def kinds(self, kind):
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind, name=None):
        found = [d for d in self.kinds(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
        return found[0]

    def pod(self, kind="Deployment"):
        return self.one(kind)["spec"]["template"]["spec"]

    def container(self, kind="Deployment"):
        return self.pod(kind)["containers"][0]

    def env(self, kind="Deployment"):
        return {e["name"]: e for e in self.container(kind).get("env", [])}

    def volumes(self, kind="Deployment"):
        return {v["name"]: v for v in self.pod(kind).get("volumes", [])}

    def mounts(self, kind="Deployment"):
        return {m["name"]: m for m in self.container(kind).get("volumeMounts", [])}


def render(vals, name="apono-connector", namespace="apono-connector", api_versions=()):
    """Renders with the real Helm engine. helm-python-sdk's public `Chart.render` does not pass
    the capabilities, so the native call (same library, same options as `helm template
    --kube-version --api-versions`) is used to render as a cluster that serves `api_versions`."""
    chart = helm.Chart.load(CHART)
    opts = {"name": name, "namespace": namespace, "is_install": True, "kube_version": "v" + KUBE_VERSIONS[-1]}
    if api_versions:
        opts["api_versions"] = list(api_versions)
    out = json.loads(_native.call_string("helm_render", chart._raw(), json.dumps(vals), json.dumps(opts)))
    docs, notes = [], ""
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            notes = text
        elif path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return Render(docs, notes)


def render_fails(vals, needles, what, **kw):
    """The render must fail, and its message must contain every needle."""
    try:
        render(vals, **kw)
    except helm.HelmError as e:
        for needle in needles:
            check(needle in str(e), f"{what}: the error names {needle!r}: {e}")
        return str(e)
    check(False, f"{what}: the render must fail")
    return ""


def validate(name, r):
    """kubernetes-validate --strict against the oldest and the newest supported Kubernetes. Kinds
    of CRDs (ServiceMonitor) have no schema there and are checked by their own tests."""
    docs = [d for d in r.docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(docs, f)
        path = f.name
    try:
        for version in KUBE_VERSIONS:
            result = subprocess.run(
                [os.path.join(BIN, "kubernetes-validate"), "-k", version, "--strict", "--quiet", path],
                capture_output=True,
                text=True,
            )
            check(result.returncode == 0,
                  f"{name}: kubernetes-validate --strict -k {version}: {result.stdout}{result.stderr}")
    finally:
        os.unlink(path)


def secret_rules(r):
    """Every RBAC rule on Secrets, with the kind and namespace of its role."""
    out = []
    for role in r.kinds("Role") + r.kinds("ClusterRole"):
        for rule in role["rules"]:
            if "secrets" in rule.get("resources", []):
                out.append((role["kind"], role["metadata"].get("namespace"), rule))
    return out


REQUIRED = {"apono": {"token": "tok-canary-123", "connectorId": "prod-connector", "url": "https://connector.example.com"}}

# The command line of the product docs, exactly as written there (placeholders filled in).
DOCS_COMMAND = (
    "helm upgrade apono-connector apono-connector "
    "--set-string apono.token=tok-canary-123 "
    "--set-string apono.connectorId=prod-connector "
    "--set serviceAccount.manageClusterRoles=true "
    r"--set allowedSecretsToRead={secret1\,secret2\,secret3} "
    "--namespace apono-connector"
)


def test_lint():
    seed = merge(values_from_command_line(DOCS_COMMAND), {"apono": {"url": "https://connector.example.com"}})
    for vals in (REQUIRED, seed):
        for version in KUBE_VERSIONS:
            result = helm.lint(CHART, values=vals, strict=True, namespace="apono-connector", kube_version="v" + version)
            check(not result.get("errors"), f"helm lint --strict (Kubernetes {version}): {result}")


def test_kube_version_range():
    with open(os.path.join(CHART, "Chart.yaml")) as f:
        chart = yaml.safe_load(f)
    check(chart.get("kubeVersion") == f">={KUBE_VERSIONS[0]}-0",
          f"Chart.yaml kubeVersion names the oldest validated version {KUBE_VERSIONS[0]}: {chart.get('kubeVersion')}")


def test_defaults():
    r = render(values())
    validate("defaults", r)
    env, container, pod = r.env(), r.container(), r.pod()
    check(env["APONO_CONNECTOR_ID"]["value"] == "prod-connector", "connector id wired")
    check(env["APONO_URL"]["value"] == "https://connector.example.com", "APONO_URL is the one given")
    check(env["APONO_HEALTH_ADDR"]["value"] == "0.0.0.0:8080", "health address")
    check("ALLOWED_SECRETS_TO_READ" not in env, "no allow-list by default")
    check(not secret_rules(r) and not r.kinds("RoleBinding") and not r.kinds("ClusterRoleBinding"),
          "no RBAC by default")
    check(pod["automountServiceAccountToken"] is False, "no API token mounted when the agent needs none")
    check(r.one("ServiceAccount")["automountServiceAccountToken"] is False, "the ServiceAccount itself mounts nothing")
    check(pod["serviceAccountName"] == "apono-connector-service-account",
          "the ServiceAccount keeps Apono's name, which existing cloud trust bindings name")
    check(pod["securityContext"]["runAsNonRoot"] is True, "runAsNonRoot")
    sc = container["securityContext"]
    check(sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, "read-only root, no escalation")
    check(container["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness on /healthz")
    check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness on /readyz")
    check(container["startupProbe"]["httpGet"]["path"] == "/healthz", "startup probe on /healthz")
    check(container["args"] == ["run"], "runs the daemon")
    check(not r.kinds("PodDisruptionBudget"), "no PDB for one replica")
    check(not r.kinds("NetworkPolicy") and not r.kinds("ServiceMonitor") and not r.kinds("StatefulSet"),
          "optional objects are off by default")
    service = r.one("Service")
    check([p["name"] for p in service["spec"]["ports"]] == ["metrics"], "the Service's port is named metrics")
    check(r.one("Deployment")["spec"]["revisionHistoryLimit"] == 10, "revisionHistoryLimit")
    rendered = yaml.safe_dump_all(r.docs)
    check("tok-canary-123" not in yaml.safe_dump(r.one("Deployment")), "the token is not in the Deployment")
    check("tok-canary-123" not in r.notes and "tok-canary-123" not in rendered.replace(
        yaml.safe_dump(r.one("Secret")), ""), "the token is only in its Secret")
    check("WARNING: image.registry is empty" in r.notes, "NOTES warns that the default image is nowhere")
    check("Ignored values" not in r.notes, f"NOTES names no ignored value that was not given: {r.notes}")
    check("port-forward svc/apono-connector 8080:8080" in r.notes and "curl -s http://127.0.0.1:8080/readyz" in r.notes,
          f"NOTES shows how to check /readyz: {r.notes}")


def test_no_default_control_plane():
    # Nothing leaves the cluster unasked: no URL, no render.
    no_url = {"apono": {"token": "t", "connectorId": "c"}}
    render_fails(no_url, ["apono.url is required", "controlPlane.enabled=true"], "no apono.url")
    check(not helm.Chart.load(CHART).values["apono"]["url"], "apono.url has no default")


def test_apono_saas_url_refused():
    # A values file or Terraform module written for Apono's connector names Apono's service as
    # apono.url: this agent would send its token there and never become ready (deploy review N1).
    for url in ("agents.apono.io", "https://Agents.Apono.IO:443/connector", "apono.io", "https://eu.agents.apono.io."):
        render_fails(values({"apono": {"url": url}}), ["is Apono's service", "apono.allowAponoHost=true"],
                     f"apono.url {url}")
    r = render(values({"apono": {"url": "agents.apono.io", "allowAponoHost": True}}))
    check(r.env()["APONO_URL"]["value"] == "agents.apono.io", "allowAponoHost lets the URL through")
    check("WARNING: apono.url agents.apono.io is in Apono's own domain" in r.notes, f"and NOTES warns: {r.notes}")
    for url in ("notapono.io", "https://apono.io.example.com", "connector.example.com"):
        r = render(values({"apono": {"url": url}}))
        check("Apono's own domain" not in r.notes, f"{url} is not Apono's: no warning")


def test_docs_command_line():
    seed = values_from_command_line(DOCS_COMMAND)
    # As written, the seed's line names no control plane: the chart says so.
    render_fails(seed, ["apono.url is required"], "the seed's line without apono.url")
    r = render(merge(seed, {"apono": {"url": "connector.example.com"}}))
    validate("docs command line", r)
    env = r.env()
    check(env["ALLOWED_SECRETS_TO_READ"]["value"] == "apono-connector/secret1,apono-connector/secret2,apono-connector/secret3",
          f"allow-list env from the command line, bare names in the release namespace: {env['ALLOWED_SECRETS_TO_READ']}")
    check(not r.kinds("ClusterRole") and not r.kinds("ClusterRoleBinding"), "no ClusterRole for named secrets")
    role = r.one("Role")
    check(role["metadata"]["namespace"] == "apono-connector", "bare names: a Role in the release namespace")
    check(role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                             "resourceNames": ["secret1", "secret2", "secret3"]}],
          f"RBAC is get on the three named secrets only: {role['rules']}")
    binding = r.one("RoleBinding")
    check(binding["metadata"]["namespace"] == "apono-connector" and binding["roleRef"]["name"] == role["metadata"]["name"],
          "the RoleBinding binds that Role in its namespace")
    check(binding["subjects"] == [{"kind": "ServiceAccount", "name": r.one("ServiceAccount")["metadata"]["name"],
                                   "namespace": "apono-connector"}], "bound to the agent's SA")
    check(r.pod()["automountServiceAccountToken"] is True, "API token mounted when the agent reads secrets")
    check("Secret access:  get on secret1, secret2, secret3" in r.notes, "NOTES states the Secret access")


def test_readme_command_line():
    # The install line of README.md's "### Helm" section, placeholders filled in, renders.
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("### Helm", 1)[1].split("\n### ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    command = next(c for c in block.replace("\\\n", " ").splitlines() if c.startswith("helm upgrade"))
    filled = {"<YOUR_REGISTRY>": "registry.example.com", "<YOUR_CONTROL_PLANE>": "connector.example.com",
              "<APONO_TOKEN>": "tok-canary-123", "<CONNECTOR_NAME>": "prod", "<YOUR_RANCHER_HOST>": "rancher.example.com"}
    for placeholder, value in filled.items():
        check(placeholder in command, f"README's helm line has {placeholder}")
        command = command.replace(placeholder, value)
    r = render(values_from_command_line(command))
    validate("README's command line", r)
    check(sorted(role["metadata"]["namespace"] for role in r.kinds("Role")) == ["apono-connector", "team-a"],
          "README's line: a Role in each namespace it names")
    check("image.registry is empty" not in r.notes, "README's line names a registry")
    check(r.env()["APONO_ALLOWED_RANCHER_HOSTS"]["value"] == "rancher.example.com" and "allowedRancherHosts is empty" not in r.notes,
          "README's line names the Rancher host keys may go to")


def test_terraform_form_of_the_list():
    # Apono's Terraform example sets "{secret1\,secret2\,secret3}" (in HCL: "{a\\,b}"), which Helm
    # parses to ONE list item holding commas: the chart must read the same three names.
    vals = values(helm.parse_set_string(r"allowedSecretsToRead={secret1\,secret2\,secret3}"),
                  {"serviceAccount": {"manageClusterRoles": True}})
    check(vals["allowedSecretsToRead"] == ["secret1,secret2,secret3"], f"Helm gives one item: {vals['allowedSecretsToRead']}")
    r = render(vals)
    check(r.one("Role")["rules"][0].get("resourceNames") == ["secret1", "secret2", "secret3"],
          "escaped-comma list gives three names")
    check(r.env()["ALLOWED_SECRETS_TO_READ"]["value"] == "apono-connector/secret1,apono-connector/secret2,apono-connector/secret3",
          "and the same three for the agent")


def test_empty_allow_list_grants_nothing():
    for listed in ([], "", None):
        r = render(values({"serviceAccount": {"manageClusterRoles": True}, "allowedSecretsToRead": listed}))
        validate(f"empty allow-list {listed!r}", r)
        check(not secret_rules(r), f"empty allow-list {listed!r}: no Secret rule at all: {secret_rules(r)}")
        check(not r.kinds("RoleBinding") and not r.kinds("ClusterRoleBinding"), "and no binding")
        check("ALLOWED_SECRETS_TO_READ" not in r.env(), "and no allow-list env")
        check(r.pod()["automountServiceAccountToken"] is False, "and no API token")
        check("Secret access:  none" in r.notes, "NOTES says there is no Secret access")


def test_namespaced_entries():
    vals = values({"serviceAccount": {"manageClusterRoles": True},
                   "allowedSecretsToRead": ["team-a/rancher-key", "local-key", "team-b/k1", "team-a/other.key"]})
    r = render(vals)
    validate("namespace/name entries", r)
    roles = {role["metadata"]["namespace"]: role for role in r.kinds("Role")}
    check(sorted(roles) == ["apono-connector", "team-a", "team-b"], f"one Role per namespace: {sorted(roles)}")
    check(roles["team-a"]["rules"][0]["resourceNames"] == ["rancher-key", "other.key"], "team-a's names")
    check(roles["team-b"]["rules"][0]["resourceNames"] == ["k1"], "team-b's name")
    check(roles["apono-connector"]["rules"][0]["resourceNames"] == ["local-key"], "a bare name is in the release namespace")
    bindings = {b["metadata"]["namespace"]: b for b in r.kinds("RoleBinding")}
    check(sorted(bindings) == sorted(roles), "a RoleBinding next to each Role")
    for ns, b in bindings.items():
        check(b["subjects"][0]["namespace"] == "apono-connector", f"{ns}: binds the agent's SA in its own namespace")
    check(not r.kinds("ClusterRole"), "never a ClusterRole for named secrets")
    # The agent reads a bare name as "any namespace"; the chart grants it in the release namespace
    # only, so the agent's own gate gets it qualified (deploy review N10).
    check(r.env()["ALLOWED_SECRETS_TO_READ"]["value"]
          == "team-a/rancher-key,apono-connector/local-key,team-b/k1,team-a/other.key",
          f"the agent gets every entry as namespace/name: {r.env()['ALLOWED_SECRETS_TO_READ']}")
    r = render(vals, namespace="jit")
    check("jit/local-key" in r.env()["ALLOWED_SECRETS_TO_READ"]["value"].split(","), "qualified with the release's namespace")
    render_fails(values({"allowedSecretsToRead": ["a/b/c"]}), ["a/b/c", "namespace/name"], "an entry with two slashes")
    render_fails(values({"allowedSecretsToRead": ["Team/Key"]}), ["Team/Key"], "an entry that is no Kubernetes name")


def test_allow_all_secrets():
    r = render(values({"serviceAccount": {"manageClusterRoles": True}, "allowAllSecrets": True}))
    validate("allowAllSecrets", r)
    role = r.one("ClusterRole")
    check(role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}], "get on all Secrets")
    check(role["metadata"]["name"] == "apono-connector-apono-connector-secret-reader",
          "the ClusterRole's name carries the release namespace")
    check("WARNING: allowAllSecrets=true" in r.notes and "EVERY Secret in EVERY namespace" in r.notes,
          "NOTES warns about allowAllSecrets")
    render_fails(values({"allowAllSecrets": True, "allowedSecretsToRead": ["a"]}),
                 ["allowAllSecrets=true and allowedSecretsToRead"], "both allowAllSecrets and a list")


def test_typos_fail():
    for typo in ({"allowedSecretToRead": ["a"]}, {"replicacount": 2}, {"apono": {"tokn": "x"}},
                 {"serviceAccount": {"manageClusterRole": True}}, {"networkPolicy": {"enable": True}}):
        render_fails(values(typo), ["additional properties"], f"unknown key {typo}")
    r = render(values({"global": {"imageRegistry": "x"}}))
    check(r.kinds("Deployment"), "`global` (umbrella charts) is accepted")


def test_service_account():
    render_fails(values({"serviceAccount": {"create": False}}),
                 ["serviceAccount.name is required when serviceAccount.create=false"], "create=false without a name")
    r = render(values({"serviceAccount": {"create": False, "name": "mine", "manageClusterRoles": True},
                       "allowedSecretsToRead": ["s"]}))
    validate("own ServiceAccount", r)
    check(not r.kinds("ServiceAccount"), "no ServiceAccount made")
    check(r.pod()["serviceAccountName"] == "mine", "the pod runs as the named account")
    check(r.one("RoleBinding")["subjects"][0]["name"] == "mine", "the Role is bound to it, never to `default`")
    r = render(values({"serviceAccount": {"name": "apono"}}))
    check(r.one("ServiceAccount")["metadata"]["name"] == "apono", "serviceAccount.name names it")


def test_two_releases_in_two_namespaces():
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    names = {}
    for ns in ("team-a", "team-b"):
        for extra in ({"allowAllSecrets": True}, {"allowedSecretsToRead": ["shared/rancher-key"]}):
            r = render(values({"serviceAccount": {"manageClusterRoles": True}}, extra), namespace=ns)
            for d in r.docs:
                if d["kind"] in cluster_scoped or d["metadata"].get("namespace") == "shared":
                    key = (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
                    check(names.setdefault(key, ns) == ns, f"{key} is claimed by the releases in {names[key]} and {ns}")
    check(len(names) == 8, f"both releases made their cluster-scoped and shared-namespace objects: {sorted(names)}")


def test_apono_values_file():
    # A values file as written for Apono's own chart: it renders, validates, and means the same.
    with open(os.path.join(HERE, "apono-values.yaml")) as f:
        apono = yaml.safe_load(f)
    r = render(apono)
    validate("Apono's values file", r)
    annotations = r.one("ServiceAccount")["metadata"]["annotations"]
    check(annotations.get("iam.gke.io/gcp-service-account") == apono["serviceAccount"]["gcpServiceAccountEmail"],
          "gcpServiceAccountEmail becomes the GKE Workload Identity annotation")
    check(annotations.get("eks.amazonaws.com/role-arn") == "arn:aws:iam::123456789012:role/apono-connector",
          f"awsRoleName + awsRoleAccountId become the IRSA annotation: {annotations}")
    check(r.one("ServiceAccount")["metadata"]["name"] == "apono-connector-service-account",
          "the ServiceAccount keeps the name Apono's GKE module binds")
    check(r.container()["image"] == "registry.apono.io/apono-connector:v1.7.1", f"image from Apono's names: {r.container()['image']}")
    check("APONO_ACTIONS_PARALLELISM" not in r.env(), "actionsParallelism \"\" keeps the agent's default")
    for ignored in ("apono.actionsQueueSize", "apono.websocketSsl", "apono.actionsParallelism"):
        check(ignored in r.notes, f"NOTES names the ignored value {ignored}")
    check("Apono's registry" in r.notes, "NOTES warns that Apono's image is Apono's connector")
    check(r.container()["resources"]["requests"] == {"cpu": "500m", "memory": "512Mi"}, "resources carried over")
    check("port-forward svc/apono-connector 8080:80" in r.notes and "curl -s http://127.0.0.1:8080/readyz" in r.notes,
          "NOTES forwards a local unprivileged port to Apono's Service port 80")

    # Apono's Terraform modules `set` the token without type = "string": an all-digit token is a number.
    vals = merge(helm.parse_set_string("apono.token=123456,apono.connectorId=42"), {"apono": {"url": "cp.example.com"}})
    check(vals["apono"]["token"] == 123456, "Helm parses the token as a number")
    r = render(vals)
    check(r.one("Secret")["data"]["APONO_TOKEN"] == "MTIzNDU2", "a numeric token is stored as its digits")
    check(r.env()["APONO_CONNECTOR_ID"]["value"] == "42", "a numeric connector id too")
    r = render(values({"apono": {"token": 123456789012345}}))
    check(r.one("Secret")["data"]["APONO_TOKEN"] == "MTIzNDU2Nzg5MDEyMzQ1", "a long numeric token from a values file is not 1.2e+14")
    r = render(values({"apono": {"actionsParallelism": "16"}, "image": {"repository": "ghcr.io/me/ac", "tag": "1.0"}}))
    check(r.env()["APONO_ACTIONS_PARALLELISM"]["value"] == "16", "a numeric string parallelism is used")
    check(r.container()["image"] == "ghcr.io/me/ac:1.0", "image.repository replaces registry/name")
    render_fails(values({"serviceAccount": {"awsRoleName": "r"}}), ["awsRoleAccountId"], "awsRoleName alone")


# The shape of the values.yaml Apono last published for its chart (apono-agent-helm-chart, chart
# 1.2.2, commit 64cdaec), every key as there, git-sync era ones included (deploy review N4).
APONO_PUBLISHED_VALUES = {
    "replicaCount": 1,
    "image": {"repository": "", "pullPolicy": "Always", "tag": ""},
    "imagePullSecrets": [], "nameOverride": "", "fullnameOverride": "",
    "serviceAccount": {"create": True, "annotations": {}, "name": "apono", "awsRoleName": "", "awsRoleAccountId": ""},
    "podAnnotations": {}, "podSecurityContext": {}, "securityContext": {},
    "service": {"type": "ClusterIP", "port": 80},
    "resources": {"limits": {"cpu": "750m", "memory": "768Mi"}, "requests": {"cpu": "500m", "memory": "512Mi"}},
    "nodeSelector": {}, "tolerations": [], "affinity": {},
    "apono": {"url": "", "token": "", "websocketSsl": "enable", "connectorId": "", "actionsParallelism": "",
              "actionsQueueSize": "", "templatesDirecttory": "/app/git-sync/apono-agent-templates"},
    "templatesRepository": "apono-io/apono-agent-templates",
    "githubAccessToken": "",
    "gitSyncImage": "",
    "gitSync": {"branchName": "master"},
}


def test_apono_published_values_file():
    # Apono's published values file, plus the seed's --set's and a control plane: it installs, and
    # NOTES names each key it ignores.
    published = values_from_command_line(DOCS_COMMAND)
    vals = merge(merge(json.loads(json.dumps(APONO_PUBLISHED_VALUES)), published),
                 {"apono": {"url": "connector.example.com"}})
    r = render(vals)
    validate("Apono's published values file", r)
    check(r.one("ServiceAccount")["metadata"]["name"] == "apono", "the ServiceAccount keeps the name Apono's file gives")
    for ignored in ("templatesRepository", "githubAccessToken", "gitSyncImage", "gitSync", "apono.templatesDirecttory"):
        check(ignored in r.notes.split("Ignored values of Apono's chart", 1)[-1].split("\n\n", 1)[0],
              f"NOTES names the ignored value {ignored}: {r.notes}")
    check("WARNING: githubAccessToken" not in r.notes, "an empty githubAccessToken is no credential to warn about")
    r = render(merge(vals, {"githubAccessToken": "ghp-canary-789"}))
    check("WARNING: githubAccessToken is set" in r.notes and "ghp-canary-789" not in r.notes,
          "NOTES asks to remove a githubAccessToken, without printing it")
    check("ghp-canary-789" not in yaml.safe_dump_all(r.docs), "the token is put in no object")
    render_fails(values({"gitSink": {}}), ["additional properties"], "still, a key Apono's chart never had fails")


def test_name_overrides():
    r = render(values({"nameOverride": "jit"}), name="prod")
    check(r.one("Deployment")["metadata"]["name"] == "prod-jit", "nameOverride shapes the full name")
    check(r.one("Deployment")["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "jit", "and the name label")
    r = render(values({"fullnameOverride": "rancher-jit", "controlPlane": {"enabled": True}, "apono": {"url": ""}}))
    validate("fullnameOverride", r)
    check(r.one("Deployment")["metadata"]["name"] == "rancher-jit", "fullnameOverride names the Deployment")
    check(r.one("StatefulSet")["metadata"]["name"] == "rancher-jit-control-plane", "and the control plane")
    check(r.one("Secret")["metadata"]["name"] == "rancher-jit", "and the token Secret")


def test_control_plane():
    vals = values({"apono": {"url": ""}, "controlPlane": {
        "enabled": True, "config": '[[integrations]]\ntype = "rancher"\nname = "prod"\n',
        "persistence": {"storageClass": "fast", "size": "2Gi"}}})
    r = render(vals)
    validate("in-cluster control plane", r)
    sts = r.one("StatefulSet")
    check(sts["spec"]["replicas"] == 1, "one replica")
    container = r.container("StatefulSet")
    check(container["args"][:2] == ["control-plane", "serve"], f"runs control-plane serve: {container['args']}")
    args = container["args"]
    check(args[args.index("--listen") + 1] == "0.0.0.0:8790", "listens on its port")
    check(args[args.index("--data-dir") + 1] == "/var/lib/apono-connector", "state in /var/lib/apono-connector")
    check(args[args.index("--config") + 1] == "/etc/apono-connector/control-plane/connector.toml", "its config file")
    claim = sts["spec"]["volumeClaimTemplates"][0]
    check(claim["spec"]["resources"]["requests"]["storage"] == "2Gi" and claim["spec"]["storageClassName"] == "fast",
          "the PVC as asked")
    mounts = r.mounts("StatefulSet")
    check(mounts[claim["metadata"]["name"]]["mountPath"] == "/var/lib/apono-connector", "the PVC holds the data dir")
    cp_env = r.env("StatefulSet")
    check(cp_env["APONO_TOKEN_FILE"]["value"] == "/var/run/secrets/apono/token" and "APONO_TOKEN" not in cp_env,
          "the control plane takes the agents' token from the same file")
    check(cp_env["APONO_DATA_DIR"]["value"] == "/var/lib/apono-connector", "exec'd access commands find the operator token")
    rotated = render(merge(json.loads(json.dumps(vals)), {"apono": {"token": "tok-rotated-456"}}))
    annotations = lambda r: r.one("StatefulSet")["spec"]["template"]["metadata"]["annotations"]
    check(annotations(rotated) != annotations(r),
          "a new token rolls the control plane, which reads it only at start (the agents re-read theirs)")
    # The control plane reads the token once (deploy review N6): a reloader annotation on its pod
    # alone restarts it when an existing Secret rotates.
    r2 = render(merge(json.loads(json.dumps(vals)), {
        "apono": {"token": "", "existingSecret": "eso-token"}, "podAnnotations": {"team": "a"},
        "controlPlane": {"podAnnotations": {"secret.reloader.stakater.com/reload": "eso-token"}}}))
    check(annotations(r2).get("secret.reloader.stakater.com/reload") == "eso-token" and annotations(r2).get("team") == "a",
          f"controlPlane.podAnnotations on the control plane's pod, with podAnnotations: {annotations(r2)}")
    check("secret.reloader.stakater.com/reload" not in (r2.one("Deployment")["spec"]["template"]["metadata"].get("annotations") or {}),
          "and not on the agents'")
    r3 = render(merge(json.loads(json.dumps(vals)), {"apono": {"token": "", "existingSecret": "eso-token"}}))
    check("rotating eso-token needs no restart" in r3.notes
          and "rollout restart statefulset/apono-connector-control-plane" in r3.notes,
          f"NOTES: a rotated existing Secret is followed (the control plane re-reads the file), and the fallback: {r3.notes}")
    service = r.one("Service", "apono-connector-control-plane")
    check(service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"], "the Service selects the control plane")
    check({p["name"]: p["port"] for p in service["spec"]["ports"]}["api"] == 8790, "the Service's API port")
    check(r.env()["APONO_URL"]["value"] == "http://apono-connector-control-plane.apono-connector.svc:8790",
          f"the agent connects to that Service: {r.env()['APONO_URL']}")
    check(r.env().get("APONO_ALLOW_INSECURE_HTTP", {}).get("value") == "true",
          "the agent is told that this http:// control plane is meant (it refuses cleartext to another host otherwise)")
    check("APONO_ALLOW_INSECURE_HTTP" not in render(values({})).env(),
          "an agent of a remote control plane is not")
    agent_selector = r.one("Deployment")["spec"]["selector"]["matchLabels"]
    cp_labels = sts["spec"]["template"]["metadata"]["labels"]
    check(not all(cp_labels.get(k) == v for k, v in agent_selector.items()),
          "the agent's selector (and its Service, PDB) does not match the control plane's pod")
    secret = r.one("Secret", "apono-connector-control-plane")
    check("connector.toml" in secret["data"], "the config is kept in a Secret")
    check("operator" not in json.dumps(r.docs).lower().replace("operator commands", ""),
          "the chart makes no operator token: control-plane serve writes it in its data dir")
    check("exec statefulset/apono-connector-control-plane -- apono-connector access list --control-plane http://127.0.0.1:8790" in r.notes, "NOTES: operator commands")
    render_fails(values({"controlPlane": {"enabled": True}}), ["apono.url and controlPlane.enabled"],
                 "apono.url and controlPlane.enabled together")
    r = render(values({"apono": {"url": ""}, "controlPlane": {"enabled": True, "persistence": {"existingClaim": "cp-state"}}}))
    validate("control plane on an existing claim", r)
    check("volumeClaimTemplates" not in r.one("StatefulSet")["spec"], "no claim template with an existing claim")
    check(r.volumes("StatefulSet")["data"]["persistentVolumeClaim"]["claimName"] == "cp-state", "the existing claim")
    check("--config" not in r.container("StatefulSet")["args"], "no --config without one")


def test_token_file():
    for vals, secret, key in ((values(), "apono-connector", "APONO_TOKEN"),
                              ({"apono": {"existingSecret": "rotated-by-eso", "existingSecretKey": "token",
                                          "connectorId": "c", "url": "cp.example.com"}}, "rotated-by-eso", "token")):
        r = render(vals)
        validate(f"token from {secret}", r)
        env = r.env()
        check("APONO_TOKEN" not in env, "no APONO_TOKEN variable: the token is a file")
        check(env["APONO_TOKEN_FILE"]["value"] == "/var/run/secrets/apono/token", "APONO_TOKEN_FILE")
        volume = r.volumes()["apono-token"]["secret"]
        check(volume["secretName"] == secret and volume["items"] == [{"key": key, "path": "token"}],
              f"the token file comes from {secret}/{key}: {volume}")
        mount = r.mounts()["apono-token"]
        check(mount["mountPath"] == "/var/run/secrets/apono" and "subPath" not in mount,
              "mounted as a directory (a subPath mount would never see a rotated token)")
    check(not [s for s in r.kinds("Secret") if s["metadata"]["name"] == "apono-connector"],
          "no token Secret of the chart's with existingSecret")


def test_existing_secrets_and_vault():
    vals = {
        "apono": {"existingSecret": "my-apono-token", "existingSecretKey": "token", "connectorId": "c", "url": "cp.example.com"},
        "hashicorpVault": {"existingSecret": "vault-defs", "existingSecretKey": "vault.json"},
    }
    r = render(vals)
    validate("existing secrets", r)
    env = r.env()
    check(not r.kinds("Secret"), "no Secret made when both are existing")
    check(env["HASHICORP_VAULT_CONFIG_FILE_PATH"]["value"] == "/etc/apono-connector/vault/vault.json", "vault file path")
    check("HASHICORP_VAULT_CONFIG" not in env, "vault definitions never in the environment")
    check(r.volumes()["vault-config"]["secret"]["secretName"] == "vault-defs", "vault secret mounted")

    r = render(values({"hashicorpVault": {"config": '[{"address":"https://vault:8200","token":"hvs.canary"}]'}}))
    validate("inline vault config", r)
    check("apono-connector-vault" in {s["metadata"]["name"] for s in r.kinds("Secret")}, "vault definitions stored in a Secret")
    check("hvs.canary" not in yaml.safe_dump(r.one("Deployment")), "vault token not in the Deployment")


def test_automount_switch():
    k8s_auth_text = '[{"address": "https://vault:8200", "auth": "kubernetes", "role": "apono"}]'
    k8s_auth_list = [{"address": "https://vault:8200", "auth": "kubernetes", "role": "apono"}]
    token_auth = '[{"address": "https://vault:8200", "auth": "approle", "role_id": "r", "secret_id": "s"}]'
    cases = (
        ({}, False, "nothing needs the API"),
        ({"hashicorpVault": {"config": k8s_auth_text}}, True, "Vault Kubernetes auth (JSON text)"),
        ({"hashicorpVault": {"config": k8s_auth_list}}, True, "Vault Kubernetes auth (a list)"),
        ({"hashicorpVault": {"config": token_auth}}, False, "Vault AppRole"),
        ({"hashicorpVault": {"config": k8s_auth_text}, "serviceAccount": {"automount": False}}, False, "asked off"),
        ({"serviceAccount": {"automount": True}}, True, "asked on"),
        ({"allowedSecretsToRead": ["s"]}, True, "the agent reads Kubernetes Secrets"),
    )
    for layer, expected, what in cases:
        r = render(values(layer))
        check(r.pod()["automountServiceAccountToken"] is expected, f"automount {expected} when {what}")
    validate("automount", render(values({"hashicorpVault": {"config": k8s_auth_list}})))


def test_service_monitor():
    r = render(values({"serviceMonitor": {"enabled": True, "additionalLabels": {"release": "prom"}}}),
               api_versions=[SERVICE_MONITOR_API, "monitoring.coreos.com/v1"])
    validate("ServiceMonitor", r)
    sm = r.one("ServiceMonitor")
    check(sm["spec"]["endpoints"][0]["port"] == "metrics", "scrapes the port named metrics")
    check(sm["metadata"]["labels"].get("release") == "prom", "additionalLabels")
    service = r.one("Service")
    check(all(service["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()),
          "selects the agent's Service")
    check("metrics" in [p["name"] for p in service["spec"]["ports"]], "whose port is named metrics")
    # `helm template` and GitOps pre-renders report no CRD: an explicit request still renders
    # (deploy review N2), the same object as where the API is served.
    r = render(values({"serviceMonitor": {"enabled": True, "additionalLabels": {"release": "prom"}}}))
    check(len(r.kinds("ServiceMonitor")) == 1 and r.one("ServiceMonitor") == sm,
          "renderMode alwaysRender (the default): the ServiceMonitor renders whatever the renderer knows")
    check("no matches for kind ServiceMonitor" in r.notes, "NOTES says what happens where the CRD is missing")
    r = render(values({"serviceMonitor": {"enabled": True, "renderMode": "skipIfMissing"}}))
    check(not r.kinds("ServiceMonitor"), "skipIfMissing: none where the cluster has no such API")
    check("--api-versions monitoring.coreos.com/v1/ServiceMonitor" in r.notes, "NOTES says why and what to do")
    r = render(values({"serviceMonitor": {"enabled": True, "renderMode": "skipIfMissing"}}), api_versions=[SERVICE_MONITOR_API])
    check(len(r.kinds("ServiceMonitor")) == 1, "skipIfMissing: rendered where the API is served")
    render_fails(values({"serviceMonitor": {"enabled": True, "renderMode": "failIfMissing"}}),
                 ["renderMode=failIfMissing", "monitoring.coreos.com/v1"], "failIfMissing without the CRD")
    render_fails(values({"serviceMonitor": {"enabled": True, "renderMode": "always"}}), ["renderMode"], "an unknown renderMode")
    for mode in ("alwaysRender", "skipIfMissing", "failIfMissing"):
        r = render(values({"serviceMonitor": {"renderMode": mode}}), api_versions=[SERVICE_MONITOR_API])
        check(not r.kinds("ServiceMonitor"), f"none unless enabled ({mode})")

    # With the in-cluster control plane, its metrics (the reconcile's sweeps and repairs) are scraped too.
    r = render(values({"apono": {"url": ""}, "controlPlane": {"enabled": True}, "serviceMonitor": {"enabled": True}}))
    cp_service = r.one("Service", "apono-connector-control-plane")
    cp_sm = r.one("ServiceMonitor", "apono-connector-control-plane")
    check(cp_sm["spec"]["selector"]["matchLabels"].items() <= cp_service["metadata"]["labels"].items()
          and cp_sm["spec"]["endpoints"][0]["port"] == "metrics"
          and "metrics" in [p["name"] for p in cp_service["spec"]["ports"]],
          "a ServiceMonitor for the control plane's metrics port")
    agent_sm = r.one("ServiceMonitor", "apono-connector")
    check(not agent_sm["spec"]["selector"]["matchLabels"].items() <= cp_service["metadata"]["labels"].items(),
          "the agents' ServiceMonitor does not scrape the control plane twice")


def test_network_policy():
    rancher = [{"to": [{"ipBlock": {"cidr": "10.20.0.0/24"}}], "ports": [{"port": 443, "protocol": "TCP"}]}]
    vault = [{"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "vault"}}}],
              "ports": [{"port": 8200, "protocol": "TCP"}]}]
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    control_plane = [{"to": [{"ipBlock": {"cidr": "10.30.0.5/32"}}], "ports": [{"port": 443, "protocol": "TCP"}]}]
    # The defaults would leave the agent DNS only (deploy review N3): the install fails, naming the value.
    render_fails(values({"networkPolicy": {"enabled": True}}), ["networkPolicy.rancher is empty", "--set-json"],
                 "a NetworkPolicy with no egress to Rancher")
    render_fails(values({"networkPolicy": {"enabled": True, "rancher": rancher}}),
                 ["networkPolicy.controlPlane is empty", "apono.url"], "a NetworkPolicy with no egress to the remote control plane")
    r = render(values({"networkPolicy": {"enabled": True, "rancher": rancher, "controlPlane": control_plane},
                       "allowedSecretsToRead": ["rancher-key"], "serviceMonitor": {"enabled": True}}))
    check("networkPolicy.secretStores is empty" in r.notes and "kubectl get endpoints kubernetes" in r.notes,
          f"NOTES: the API server needs a rule when the agent reads Kubernetes Secrets: {r.notes}")
    check("networkPolicy.metricsFrom is empty" in r.notes, "NOTES: Prometheus cannot scrape without metricsFrom")
    check("NodeLocal DNSCache" in r.notes, "NOTES: the DNS rule's variants")

    r = render(values({"networkPolicy": {"enabled": True, "rancher": rancher, "controlPlane": control_plane,
                                         "secretStores": vault, "metricsFrom": monitoring},
                       "allowedSecretsToRead": ["rancher-key"], "serviceMonitor": {"enabled": True}}))
    validate("NetworkPolicy", r)
    check("secretStores is empty" not in r.notes and "metricsFrom is empty" not in r.notes, "no warning once both are set")
    policy = r.one("NetworkPolicy")
    check(policy["spec"]["podSelector"]["matchLabels"] == r.one("Deployment")["spec"]["selector"]["matchLabels"],
          "applies to the agent's pods")
    check(sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"], "both directions")
    egress = policy["spec"]["egress"]
    check(egress == helm.Chart.load(CHART).values["networkPolicy"]["dns"] + rancher + control_plane + vault,
          f"egress: DNS, Rancher, the control plane and the secret stores, nothing else: {egress}")
    ingress = policy["spec"]["ingress"]
    check(len(ingress) == 1 and ingress[0]["ports"] == [{"port": "metrics", "protocol": "TCP"}],
          "ingress to the metrics port only")
    check(monitoring[0] in ingress[0]["from"], "from what the values name")
    test_pod = r.one("Pod")
    check(any(all(test_pod["metadata"]["labels"].get(k) == v for k, v in peer.get("podSelector", {}).get("matchLabels", {}).items())
              and "podSelector" in peer for peer in ingress[0]["from"]), "and from the helm test pod")

    r = render(values({"apono": {"url": ""}, "controlPlane": {"enabled": True},
                       "networkPolicy": {"enabled": True, "rancher": rancher}}))
    validate("NetworkPolicy with the control plane", r)
    agent = r.one("NetworkPolicy", "apono-connector")
    cp_pod_labels = r.one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    check(any(rule["to"][0].get("podSelector", {}).get("matchLabels", {}).items() <= cp_pod_labels.items()
              and rule["ports"] == [{"port": "api", "protocol": "TCP"}] for rule in agent["spec"]["egress"]),
          "the agent may reach the in-cluster control plane")
    cp = r.one("NetworkPolicy", "apono-connector-control-plane")
    check(cp["spec"]["egress"] == [] and "Egress" in cp["spec"]["policyTypes"], "the control plane connects nowhere")
    check(cp["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == r.one("Deployment")["spec"]["selector"]["matchLabels"],
          "its API only from the agents")


# Metric families no drive of live_metrics.py can make show without a change to the binary: an
# API key with an expiry (the simulator's CLI sets none), a binding the reconcile sweeps (only
# after a revoke was missed). Each must at least be registered in src/telemetry/metrics.rs.
ALERTS = {"AponoConnectorAccessOverdue", "AponoConnectorRevokesLate", "AponoConnectorRevokeOverdue", "AponoConnectorExpiredBindingSwept", "AponoConnectorJobsFailing",
          "AponoConnectorControlPlaneUnreachable", "AponoConnectorTokenRefused", "AponoConnectorSecretStoreRefusing",
          "AponoConnectorSecretStoreUnreachable", "AponoConnectorRancherKeyRejected", "AponoConnectorRancherKeyExpiresSoon"}


def connector_binary():
    """The debug binary tests/deploy/run builds (APONO_CONNECTOR_BIN overrides)."""
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.environ.get("APONO_CONNECTOR_BIN") or os.path.join(target, "debug", "apono-connector")


def promql_selectors(expr, what):
    """The vector selectors of a PromQL expression (it must parse), as (name, {label: (op, value)})."""
    import promql_parser

    try:
        ast = promql_parser.parse(expr)
    except ValueError as e:
        check(False, f"{what}: PromQL does not parse: {e}: {expr}")
        return []
    found = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name, {m.name: (str(m.op).rsplit(".", 1)[-1], m.value) for m in node.matchers.matchers}))

    promql_parser.walk(ast, visit)
    return found


def dashboard_exprs(dashboard):
    """(panel title, expr) of every query, with Grafana's variables given values PromQL accepts."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "5m").replace("$namespace", "ns").replace("$job", ".+")
            out.append((panel["title"], expr))
    return out


def test_dashboard_and_rules():
    r = render(values({"grafanaDashboard": {"enabled": True}, "prometheusRule": {"enabled": True}}))
    validate("dashboard and rules", r)
    config_map = r.one("ConfigMap")
    check(config_map["metadata"]["labels"].get("grafana_dashboard") == "1", "the dashboard carries the sidecar's label")
    dashboard = json.loads(config_map["data"]["apono-connector.json"])
    with open(os.path.join(CHART, "files", "grafana-dashboard.json")) as f:
        check(dashboard == json.load(f), "the ConfigMap holds files/grafana-dashboard.json as it is")
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for subject in ("accesses by state, and overdue", "revoke lag after expiry", "queue depth",
                    "grants and revokes", "revokes not done", "swept", "jobs by kind and outcome", "rancher errors",
                    "secret-store errors", "control-plane errors", "leases", "worker pool"):
        check(subject in titles, f"the dashboard shows {subject}")
    rule = r.one("PrometheusRule")
    alerts = {a["alert"]: a for g in rule["spec"]["groups"] for a in g["rules"]}
    check(set(alerts) == ALERTS, f"the alerts: {sorted(alerts)}")
    for name, a in alerts.items():
        check(a["labels"].get("severity") in ("warning", "critical") and a["annotations"].get("summary")
              and a["annotations"].get("description"), f"{name}: severity, summary and description")

    used = {}
    for name, a in alerts.items():
        for metric, matchers in promql_selectors(a["expr"], name):
            used.setdefault(metric, name)
            check(matchers.get("namespace") == ("Equal", "apono-connector")
                  and matchers.get("job") == ("Re", "apono-connector|apono-connector-control-plane"),
                  f"{name}: {metric} is scoped to this release's series: {matchers}")
    for title, expr in dashboard_exprs(dashboard):
        for metric, matchers in promql_selectors(expr, f"dashboard panel {title!r}"):
            used.setdefault(metric, f"dashboard panel {title!r}")
            check("namespace" in matchers and "job" in matchers, f"panel {title!r}: {metric} follows the variables")
    check(len(used) >= 12, f"the dashboard and the rules use the metrics: {sorted(used)}")

    r = render(values({"prometheusRule": {"enabled": True, "selector": 'cluster="eu"', "apiKeyExpiryDays": 7}}))
    rule = {a["alert"]: a for g in r.one("PrometheusRule")["spec"]["groups"] for a in g["rules"]}
    check('cluster="eu"' in rule["AponoConnectorRancherKeyRejected"]["expr"]
          and rule["AponoConnectorRancherKeyExpiresSoon"]["expr"].rstrip().endswith("< 7"),
          "prometheusRule.selector and apiKeyExpiryDays reach the rules")
    r = render(values({"prometheusRule": {"enabled": True, "overdueFor": "2m", "revokeLagSeconds": 60}}))
    rule = {a["alert"]: a for g in r.one("PrometheusRule")["spec"]["groups"] for a in g["rules"]}
    check(rule["AponoConnectorAccessOverdue"]["for"] == "2m" and rule["AponoConnectorRevokesLate"]["expr"].rstrip().endswith("> 60"),
          "prometheusRule.overdueFor and revokeLagSeconds reach the rules")
    render_fails(values({"prometheusRule": {"enabled": True, "overdueFor": "5 minutes"}}), ["overdueFor"],
                 "an overdueFor that is no Prometheus duration")
    check(not render(values()).kinds("PrometheusRule") and not render(values()).kinds("ConfigMap"), "both off by default")

    # Every metric name they use is served by a running daemon's /metrics.
    binary = connector_binary()
    if not os.path.exists(binary):
        check(False, f"{binary} is missing: tests/deploy/run builds it (cargo build --bin apono-connector)")
        return
    import live_metrics

    served = live_metrics.collect(binary)
    for metric in ("apono_connector_accesses", "apono_connector_accesses_overdue", "apono_connector_jobs_queued",
                   "apono_connector_revoke_lag_seconds_bucket", "apono_connector_api_key_expires_in_days",
                   "apono_connector_swept_bindings_total"):
        check(metric in used, f"the dashboard or the rules use {metric}")
    for metric, where in sorted(used.items()):
        check(metric in served, f"{where}: {metric} is not on a running daemon's /metrics ({sorted(served)})")


def test_pod_disruption_budget():
    r = render(values({"replicaCount": 3}))
    validate("HA", r)
    check(r.one("Deployment")["spec"]["replicas"] == 3, "three replicas")
    pdb = r.one("PodDisruptionBudget")
    check(pdb["spec"] == {"minAvailable": 1, "unhealthyPodEvictionPolicy": "AlwaysAllow",
                          "selector": {"matchLabels": r.one("Deployment")["spec"]["selector"]["matchLabels"]}},
          f"PDB keeps one serving and lets unready pods be evicted: {pdb['spec']}")
    r = render(values({"replicaCount": 3, "podDisruptionBudget": {"maxUnavailable": "50%"}}))
    validate("PDB maxUnavailable", r)
    spec = r.one("PodDisruptionBudget")["spec"]
    check(spec.get("maxUnavailable") == "50%" and "minAvailable" not in spec, f"maxUnavailable instead: {spec}")
    check(not render(values({"replicaCount": 3, "podDisruptionBudget": {"enabled": False}})).kinds("PodDisruptionBudget"),
          "podDisruptionBudget.enabled=false")


def test_helm_test_hook():
    r = render(values({"service": {"port": 9090}}), namespace="jit")
    validate("helm test hook", r)
    pod = r.one("Pod")
    check(pod["metadata"]["annotations"]["helm.sh/hook"] == "test", "a helm test hook")
    container = pod["spec"]["containers"][0]
    service = r.one("Service")
    url = f"http://{service['metadata']['name']}.jit.svc:9090/readyz"
    check(container["args"] == ["healthcheck", "--url", url], f"checks /readyz through the Service: {container['args']}")
    check(container["image"] == r.container()["image"], "with the image's own binary")
    check(pod["spec"]["automountServiceAccountToken"] is False, "and no API token")
    check(not render(values({"helmTest": {"enabled": False}})).kinds("Pod"), "helmTest.enabled=false")
    # On tainted, dedicated nodes the test pod goes where the agents go (deploy review N9).
    placement = {"nodeSelector": {"pool": "infra"}, "priorityClassName": "critical",
                 "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
                 "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                     {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["infra"]}]}]}}}}
    r = render(values(placement))
    validate("helm test hook placement", r)
    for key, value in placement.items():
        check(r.one("Pod")["spec"].get(key) == value and r.pod().get(key) == value,
              f"{key} on the test pod as on the agents: {r.one('Pod')['spec'].get(key)}")


def test_image():
    digest = "sha256:" + "a" * 64
    cases = (
        ({}, "apono-connector:0.1.0"),
        ({"image": {"registry": "registry.example.com/team"}}, "registry.example.com/team/apono-connector:0.1.0"),
        ({"image": {"registry": "registry.example.com", "digest": digest}}, f"registry.example.com/apono-connector@{digest}"),
        ({"image": {"tag": None}}, "apono-connector:0.1.0"),
        ({"image": {"tag": 1.7}}, "apono-connector:1.7"),
        ({"image": {"tag": "v2"}}, "apono-connector:v2"),
    )
    for layer, expected in cases:
        r = render(values(layer))
        check(r.container()["image"] == expected, f"image {layer}: {r.container()['image']} != {expected}")
    r = render(values({"image": {"registry": "registry.example.com", "digest": digest}}))
    validate("image digest", r)
    check("image.registry is empty" not in r.notes, "no registry warning once a registry is set")
    render_fails(values({"image": {"digest": "latest"}}), ["digest"], "a digest that is no digest")


def test_knobs():
    ca = {"name": "corp-ca", "configMap": {"name": "corp-ca"}}
    ca_mount = {"name": "corp-ca", "mountPath": "/etc/apono-connector/ca", "readOnly": True}
    spread = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway",
               "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "apono-connector"}}}]
    r = render(values({
        "extraEnv": [{"name": "SSL_CERT_FILE", "value": "/etc/apono-connector/ca/ca.crt"}],
        "envFrom": [{"configMapRef": {"name": "proxy"}}],
        "extraVolumes": [ca], "extraVolumeMounts": [ca_mount],
        "topologySpreadConstraints": spread, "priorityClassName": "critical", "revisionHistoryLimit": 3,
        "livenessProbe": {"periodSeconds": 30}, "readinessProbe": None, "strategy": {"type": "Recreate"},
    }))
    validate("knobs", r)
    pod, container = r.pod(), r.container()
    check(r.env()["SSL_CERT_FILE"]["value"] == "/etc/apono-connector/ca/ca.crt", "extraEnv")
    check(container["envFrom"] == [{"configMapRef": {"name": "proxy"}}], "envFrom")
    check(r.volumes()["corp-ca"] == ca and r.mounts()["corp-ca"] == ca_mount, "a CA bundle mounted with extraVolumes")
    check(pod["topologySpreadConstraints"] == spread, "topologySpreadConstraints")
    check(pod["priorityClassName"] == "critical", "priorityClassName")
    check(r.one("Deployment")["spec"]["revisionHistoryLimit"] == 3, "revisionHistoryLimit")
    check(r.one("Deployment")["spec"]["strategy"] == {"type": "Recreate"}, "strategy")
    check(container["livenessProbe"]["periodSeconds"] == 30 and container["livenessProbe"]["httpGet"]["path"] == "/healthz",
          "a probe setting overrides one field")
    check("readinessProbe" not in container, "null turns a probe off")
    # A handler of one's own replaces the default httpGet (deploy review N7): two handlers would
    # pass kubernetes-validate and be refused by the API server.
    r = render(values({"livenessProbe": {"tcpSocket": {"port": "metrics"}},
                       "readinessProbe": {"exec": {"command": ["apono-connector", "healthcheck"]}}}))
    container = r.container()
    check("httpGet" not in container["livenessProbe"] and container["livenessProbe"]["tcpSocket"] == {"port": "metrics"}
          and container["livenessProbe"]["periodSeconds"] == 10, f"tcpSocket replaces httpGet: {container['livenessProbe']}")
    check(list(k for k in container["readinessProbe"] if k in ("httpGet", "exec")) == ["exec"],
          f"exec replaces httpGet: {container['readinessProbe']}")
    check(container["startupProbe"]["httpGet"]["path"] == "/healthz", "the untouched probe keeps its httpGet")


def test_agent_config_and_grace():
    # Settings with no environment variable (agent.shutdown_grace_seconds, ...) come from a config
    # file the chart mounts; the pod's grace must outlast the agent's (deploy review N8).
    r = render(values())
    check(r.pod()["terminationGracePeriodSeconds"] == 45 and "APONO_CONFIG" not in r.env(), "default: 45 s, no file")
    toml = "[agent]\nshutdown_grace_seconds = 100\nlease_wait_seconds = 10\n"
    render_fails(values({"config": toml}), ["terminationGracePeriodSeconds=45", "shutdown_grace_seconds (100, from config) + 10"],
                 "a grace period shorter than the agent's")
    render_fails(values({"terminationGracePeriodSeconds": 40}), ["terminationGracePeriodSeconds=40", "(30, the default)"],
                 "a grace period not above the default 30 s + 10")
    r = render(values({"config": toml, "terminationGracePeriodSeconds": 120}))
    validate("agent config file", r)
    check(r.pod()["terminationGracePeriodSeconds"] == 120, "terminationGracePeriodSeconds")
    secret = r.one("Secret", "apono-connector-config")
    check(secret["data"]["connector.toml"] == base64.b64encode(toml.encode()).decode(), "the file, kept in a Secret")
    check(r.env()["APONO_CONFIG"]["value"] == "/etc/apono-connector/config/connector.toml", "APONO_CONFIG names it")
    check(r.mounts()["agent-config"]["mountPath"] == "/etc/apono-connector/config"
          and r.volumes()["agent-config"]["secret"]["secretName"] == "apono-connector-config", "mounted from that Secret")
    rolled = render(values({"config": toml.replace("lease_wait_seconds = 10", "lease_wait_seconds = 15"),
                            "terminationGracePeriodSeconds": 120}))
    check(rolled.one("Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
          != r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"],
          "a changed file rolls the pods (the agent reads it at start)")
    r = render(values({"existingConfigMap": "agent-settings", "existingConfigMapKey": "agent.toml"}))
    validate("agent config from an existing ConfigMap", r)
    check(r.volumes()["agent-config"]["configMap"] == {"name": "agent-settings", "items": [{"key": "agent.toml", "path": "agent.toml"}]}
          and r.env()["APONO_CONFIG"]["value"] == "/etc/apono-connector/config/agent.toml" and not r.kinds("Secret")[1:],
          f"existingConfigMap is mounted, no Secret made for it: {r.volumes()['agent-config']}")


def test_listen_host():
    # IPv6 single-stack clusters probe the pod's IPv6 address (deploy review N11).
    vals = values({"apono": {"url": ""}, "controlPlane": {"enabled": True}, "listenHost": "[::]"})
    r = render(vals)
    validate("listenHost [::]", r)
    check(r.env()["APONO_HEALTH_ADDR"]["value"] == "[::]:8080", "the agent's health address")
    check(r.env("StatefulSet")["APONO_HEALTH_ADDR"]["value"] == "[::]:8080", "the control plane's health address")
    args = r.container("StatefulSet")["args"]
    check(args[args.index("--listen") + 1] == "[::]:8790", f"the control plane's API: {args}")
    check(render(values({"listenHost": "::"})).env()["APONO_HEALTH_ADDR"]["value"] == "[::]:8080", "a bare :: is bracketed")
    render_fails(values({"listenHost": "localhost"}), ["listenHost"], "a listenHost that is no address")


def test_image_registry_and_version_label():
    # global.imageRegistry, as umbrella charts set it for Bitnami-style subcharts (deploy review N16).
    r = render(values({"global": {"imageRegistry": "reg.corp"}}))
    check(r.container()["image"] == "reg.corp/apono-connector:0.1.0", f"global.imageRegistry: {r.container()['image']}")
    check("image.registry is empty" not in r.notes, "no empty-registry warning with a global registry")
    r = render(values({"global": {"imageRegistry": "reg.corp"}, "image": {"registry": "mine.example.com"}}))
    check(r.container()["image"] == "reg.corp/apono-connector:0.1.0", "the global registry wins, as in Bitnami charts")
    check(render(values({"global": {}})).container()["image"] == "apono-connector:0.1.0", "an empty global changes nothing")
    # app.kubernetes.io/version says what runs (deploy review N17).
    version = lambda r: {d["metadata"]["labels"]["app.kubernetes.io/version"] for d in r.docs if "labels" in d["metadata"]}
    check(version(render(values())) == {"0.1.0"}, "appVersion by default")
    check(version(render(values({"image": {"tag": "v1.4.2"}}))) == {"v1.4.2"}, "the tag when one is set")
    check(version(render(values({"image": {"tag": 1.7}}))) == {"1.7"}, "a numeric tag as written")
    check(version(render(values({"image": {"digest": "sha256:" + "ab" * 32}}))) == {"sha256-abababababab"},
          "a digest alone: its first 12 hex digits")
    r = render(values({"image": {"tag": "1.0+build/7"}}))
    validate("a tag with characters a label cannot hold", r)
    check(version(r) == {"1.0_build_7"}, f"made a valid label value: {version(r)}")


def test_allowed_rancher_hosts():
    # Where the agent may send a Rancher key, whatever a job says (issue 19, item 1).
    for given in (["rancher.example.com", "Rancher2.example.com:8443"], "rancher.example.com, rancher2.example.com:8443",
                  ["rancher.example.com,rancher2.example.com:8443"]):
        r = render(values({"allowedRancherHosts": given}))
        validate(f"allowedRancherHosts {given!r}", r)
        check(r.env()["APONO_ALLOWED_RANCHER_HOSTS"]["value"] == "rancher.example.com,rancher2.example.com:8443",
              f"allowedRancherHosts {given!r}: {r.env().get('APONO_ALLOWED_RANCHER_HOSTS')}")
        check("Rancher hosts:  rancher.example.com, rancher2.example.com:8443 only" in r.notes
              and "allowedRancherHosts is empty" not in r.notes, "NOTES names them, without the warning")
    r = render(values(helm.parse_set_string(r"allowedRancherHosts={a.example.com\,b.example.com}")))
    check(r.env()["APONO_ALLOWED_RANCHER_HOSTS"]["value"] == "a.example.com,b.example.com", "Helm's escaped-comma list")
    for empty in ([], "", None):
        r = render(values({"allowedRancherHosts": empty}))
        check("APONO_ALLOWED_RANCHER_HOSTS" not in r.env(), f"{empty!r}: no variable")
        check("WARNING: allowedRancherHosts is empty: the control plane decides where keys go" in r.notes,
              f"{empty!r}: NOTES warns")
    for bad in ("https://rancher.example.com", "rancher.example.com/v3", "rancher example.com"):
        render_fails(values({"allowedRancherHosts": [bad]}), ["allowedRancherHosts", "host:port"], f"allowedRancherHosts {bad!r}")


def test_control_plane_on_postgresql():
    # With a database the in-cluster control plane is several replicas (issue 20, item 6).
    db = {"apono": {"url": ""}, "controlPlane": {
        "enabled": True, "database": {"existingSecret": "pg-app", "key": "uri"},
        "operatorToken": {"existingSecret": "apono-operator"}}}
    r = render(values(db))
    validate("control plane on PostgreSQL", r)
    check(not r.kinds("StatefulSet"), "no StatefulSet: the state is in the database")
    cp = r.one("Deployment", "apono-connector-control-plane")
    check(cp["spec"]["replicas"] == 2, "two replicas by default")
    pod = cp["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    check(env["APONO_DATABASE_URL_FILE"] == "/var/run/secrets/apono-database/uri"
          and volumes["database"]["secret"] == {"secretName": "pg-app"}
          and mounts["database"] == "/var/run/secrets/apono-database", "the URL Secret mounted as APONO_DATABASE_URL_FILE")
    check(env["APONO_OPERATOR_TOKEN_FILE"] == "/var/run/secrets/apono-operator/token"
          and volumes["operator-token"]["secret"]["secretName"] == "apono-operator", "the shared operator token as a file")
    check("APONO_DATABASE_URL" not in env and "APONO_OPERATOR_TOKEN" not in env, "neither secret in the environment")
    check(volumes["data"] == {"name": "data", "emptyDir": {"sizeLimit": "64Mi"}}, "no PVC")
    zones = [c for c in pod["topologySpreadConstraints"] if c["topologyKey"] == "topology.kubernetes.io/zone"]
    check(len(zones) == 1 and zones[0]["labelSelector"]["matchLabels"] == cp["spec"]["selector"]["matchLabels"],
          f"spread across zones: {pod.get('topologySpreadConstraints')}")
    pdb = r.one("PodDisruptionBudget", "apono-connector-control-plane")
    check(pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"]["matchLabels"] == cp["spec"]["selector"]["matchLabels"]
          and pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", f"a PDB keeps one serving: {pdb['spec']}")
    check("Deployment apono-connector-control-plane, 2 replicas on the PostgreSQL of Secret pg-app" in r.notes
          and "exec deployment/apono-connector-control-plane" in r.notes, "NOTES: what runs and the operator command")
    agent_env = {e["name"]: e["value"] for e in r.one("Deployment", "apono-connector")["spec"]["template"]["spec"]["containers"][0]["env"]}
    check(agent_env["APONO_URL"] == "http://apono-connector-control-plane.apono-connector.svc:8790", "the agents use its Service")
    r = render(values(db, {"controlPlane": {"replicas": 3, "topologySpreadConstraints": []}}))
    cp = r.one("Deployment", "apono-connector-control-plane")
    check(cp["spec"]["replicas"] == 3 and "topologySpreadConstraints" not in cp["spec"]["template"]["spec"],
          "controlPlane.replicas; [] turns the spread off")
    r = render(values(db, {"controlPlane": {"replicas": 1}}))
    check(not r.kinds("PodDisruptionBudget"), "no PDB for one replica")
    check(not render(values(db, {"podDisruptionBudget": {"enabled": False}})).kinds("PodDisruptionBudget"),
          "podDisruptionBudget.enabled=false turns it off too")
    render_fails(values(db, {"controlPlane": {"operatorToken": {"existingSecret": ""}}}),
                 ["controlPlane.operatorToken.existingSecret is required"], "a database without a shared operator token")
    render_fails(values({"apono": {"url": ""}, "controlPlane": {"enabled": True, "replicas": 2}}),
                 ["controlPlane.replicas=2 needs controlPlane.database.existingSecret"], "replicas on SQLite")
    r = render(values({"apono": {"url": ""}, "controlPlane": {"enabled": True}}))
    check(r.one("StatefulSet")["spec"]["replicas"] == 1 and not r.kinds("PodDisruptionBudget"),
          "without a database: the one-replica StatefulSet")
    # Its NetworkPolicy lets it reach the database, and nothing else but DNS.
    np = {"networkPolicy": {"enabled": True, "rancher": [{"to": [{"ipBlock": {"cidr": "10.0.0.10/32"}}]}]}}
    render_fails(values(db, np), ["networkPolicy.database is empty"], "a NetworkPolicy with no way to the database")
    pg = [{"to": [{"podSelector": {"matchLabels": {"cnpg.io/cluster": "pg"}}}], "ports": [{"port": 5432}]}]
    r = render(values(db, np, {"networkPolicy": {"database": pg}}))
    validate("control plane on PostgreSQL behind a NetworkPolicy", r)
    egress = r.one("NetworkPolicy", "apono-connector-control-plane")["spec"]["egress"]
    check(egress[-1] == pg[0] and len(egress) == 2, f"egress: DNS and the database: {egress}")


def test_readme_two_releases():
    # Two releases in one namespace would claim the same ServiceAccount (deploy review N12).
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("### Helm", 1)[1].split("\n### ", 1)[0]
    check("serviceAccount.name" in section and "same namespace" in section,
          "README's Helm section says how to run two releases in one namespace")
    with open(os.path.join(CHART, "README.md")) as f:
        chart_readme = f.read()
    check("statefulset/<release>-control-plane" not in chart_readme, "the chart README names the control plane's object right")
    a = render(values({"serviceAccount": {"name": "apono-b"}}), name="b")
    check(a.one("ServiceAccount")["metadata"]["name"] == "apono-b", "serviceAccount.name gives the second release its own")


def test_exit_codes():
    # A malformed argument is a usage error, exit 2, however it is malformed (deploy review N13);
    # the message never echoes a --store value, which may hold inline credentials.
    binary = connector_binary()
    if not os.path.exists(binary):
        check(False, f"{binary} is missing: tests/deploy/run builds it (cargo build --bin apono-connector)")
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APONO_", "HASHICORP_", "ALLOWED_SECRETS"))}
    canary = "canary-s3cret-4711"
    cases = (
        (["access", "request", "--integration", "x", "--user", "a", "--role", "r", "--resource", "global", "--ttl", "0s"], "--ttl"),
        (["access", "request", "--integration", "x", "--user", "a", "--role", "r", "--resource", "global", "--ttl", "5x"], "--ttl"),
        (["healthcheck", "--url", "notaurl"], "--url"),
        (["healthcheck", "--url", "ftp://x"], "http://"),
        (["healthcheck", "--timeout-seconds", "0"], "--timeout-seconds"),
        (["secret", "get", "--store", '{"type":"NOPE"}'], "--store"),
        (["secret", "get", "--store", json.dumps({"type": "APONO", "credentials": {"secret_key": canary}, "x": 1})], "--store"),
        (["--bogus"], "--bogus"),
    )
    for args, needle in cases:
        done = subprocess.run([binary, *args], capture_output=True, text=True, env=env, timeout=30)
        check(done.returncode == 2 and needle in done.stderr, f"{args}: exit {done.returncode}, expected 2 naming {needle}: {done.stderr}")
        check(canary not in done.stderr + done.stdout, f"{args}: the secret is echoed: {done.stderr}")
    done = subprocess.run([binary, "healthcheck", "--url", "http://127.0.0.1:1/readyz"], capture_output=True, text=True,
                          env=env, timeout=30)
    check(done.returncode == 3, f"a well-formed URL that does not answer is 'not ready' (3): {done.returncode}")

    # Every command's --help ends with the exit codes; the man pages give them, and the
    # environment table, sections of their own, verbatim, and name no page that is not written
    # (deploy review N14).
    for sub in (["run"], ["healthcheck"], ["access", "list"], ["control-plane", "serve"], ["secret", "get"]):
        done = subprocess.run([binary, *sub, "--help"], capture_output=True, text=True, env=env, timeout=30)
        check(done.returncode == 0 and "Exit codes:" in done.stdout and "2  usage error" in done.stdout,
              f"{sub} --help shows the exit codes")
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([binary, "man", "--out-dir", tmp], capture_output=True, text=True, env=env, timeout=30)
        check(done.returncode == 0, f"man --out-dir: {done.stderr}")
        pages = set(os.listdir(tmp))
        for page in sorted(pages):
            text = open(os.path.join(tmp, page)).read()
            named = {ref.replace("\\-", "-") + ".1" for ref in re.findall(r"(apono\\-connector[a-z\\-]*)\(1\)", text)}
            check(named <= pages, f"{page} names pages that are not written: {sorted(named - pages)}")
            check('.SH "EXIT STATUS"\n.nf\nExit codes:' in text, f"{page}: an EXIT STATUS section, verbatim")
        run_page = open(os.path.join(tmp, "apono-connector-run.1")).read()
        check('.SH "ENVIRONMENT"\n.nf\nEnvironment' in run_page and "EXTRA" not in run_page,
              "run(1): the environment table in its own section, not reflowed")


def test_missing_values_fail_clearly():
    for vals, needle in (({"apono": {"connectorId": "c", "url": "u"}}, "apono.token"),
                         ({"apono": {"token": "t", "url": "u"}}, "apono.connectorId")):
        render_fails(vals, [needle], f"without {needle}")
    render_fails(values({"replicaCount": "many"}), ["replicaCount"], "a non-integer replicaCount")


def readme_generator():
    """The pinned @bitnami/readme-generator-for-helm that tests/deploy/run installs with npm."""
    path = os.environ.get("APONO_README_GENERATOR") or os.path.join(
        os.path.dirname(BIN), "readme-generator", "node_modules", ".bin", "readme-generator")
    return path if os.path.exists(path) else None


def test_chart_readme():
    # The chart's README.md is generated from the `## @param` comments of values.yaml; the
    # committed one must be what the generator makes (and the generator fails on an undocumented value).
    generator = readme_generator()
    if generator is None:
        check(False, "readme-generator-for-helm is not installed: run tests/deploy/run (it installs it with npm), "
                     "or point APONO_README_GENERATOR at one")
        return
    readme = os.path.join(CHART, "README.md")
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "README.md")
        shutil.copy(readme, copy)
        result = subprocess.run([generator, "--values", os.path.join(CHART, "values.yaml"), "--readme", copy],
                                capture_output=True, text=True)
        check(result.returncode == 0, f"readme-generator: {result.stdout}{result.stderr}")
        with open(copy) as a, open(readme) as b:
            check(a.read() == b.read(), "deploy/helm/apono-connector/README.md is out of date: run "
                  f"{generator} --values deploy/helm/apono-connector/values.yaml --readme deploy/helm/apono-connector/README.md")


def test_dockerfile():
    path = os.path.join(ROOT, "Dockerfile")
    result = subprocess.run([os.path.join(BIN, "hadolint"), path], capture_output=True, text=True)
    check(result.returncode == 0, f"hadolint: {result.stdout}{result.stderr}")
    text = open(path).read()
    lines = [l.strip() for l in text.splitlines()]
    check('ENTRYPOINT ["apono-connector"]' in text and 'CMD ["run"]' in text, "entrypoint and cmd")
    check("USER 65532" in text and "EXPOSE 8080" in text, "non-root user, port 8080")
    # Every base image is pinned by a digest of the right form (an ARG the FROM line uses).
    check(lines[0].startswith("# syntax=docker/dockerfile:") and "@sha256:" in lines[0] and len(lines[0].split("@sha256:")[1]) == 64,
          f"the syntax frontend is pinned by digest too: {lines[0]}")
    froms = [l for l in lines if l.startswith("FROM ")]
    check(len(froms) == 2 and all("@${" in l for l in froms), f"base images pinned by digest: {froms}")
    digests = [l.split("=", 1)[1] for l in lines if l.startswith("ARG ") and "_DIGEST=" in l]
    check(
        len(digests) == 2
        and all(d.startswith("sha256:") and len(d) == 71 and all(c in "0123456789abcdef" for c in d[7:]) for d in digests),
        f"digest ARGs are sha256 digests: {digests}",
    )
    # The probe needs no curl: the binary asks its own /healthz. Liveness, not readiness: with
    # /readyz a control-plane outage marks every container unhealthy and ECS/Swarm replace them all.
    check(
        any(l.startswith("HEALTHCHECK") for l in lines) and 'CMD ["apono-connector", "healthcheck", "--live"]' in text,
        "HEALTHCHECK runs `apono-connector healthcheck --live`",
    )
    check("--mount=type=cache,target=/usr/local/cargo/registry" in text and "--mount=type=cache,target=/src/target" in text,
          "BuildKit cache mounts for the cargo registry and target/")
    for label in ("title", "description", "version", "revision", "licenses", "source"):
        check(f"org.opencontainers.image.{label}=" in text, f"OCI label {label}")
    check('org.opencontainers.image.licenses="Apache-2.0"' in text, "the licence label matches LICENSE")
    # Standalone state survives the container.
    check('VOLUME ["/var/lib/apono-connector"]' in text and "APONO_DATA_DIR=/var/lib/apono-connector" in text,
          "standalone state on a volume at APONO_DATA_DIR")
    check("-o 65532 -g 65532 /var/lib/apono-connector" in text, "the data dir belongs to the runtime user")
    # What the build copies must exist (build.rs is part of the build).
    for copied in ("Cargo.toml", "Cargo.lock", "build.rs", "src", "benches"):
        check(os.path.exists(os.path.join(ROOT, copied)), f"COPY source {copied} exists")
        check(any(l.startswith("COPY ") and copied in l.split() for l in lines), f"the build copies {copied}")


def test_terraform():
    # The checks live in terraform_checks.py (syntax as Terraform reads it, fmt, and what each
    # example grants); this keeps them in the runner's list.
    import terraform_checks

    terraform_checks.run(check)


def test_openapi():
    # docs/openapi.yaml is the contract of protocol v1 and the operator API: it must stay valid.
    from openapi_spec_validator import validate
    from openapi_spec_validator.readers import read_from_filename

    spec, _ = read_from_filename(os.path.join(ROOT, "docs", "openapi.yaml"))
    validate(spec)
    paths = spec.get("paths", {})
    for needle in ("sessions", "jobs:lease", ":renew", ":complete", ":release", "/resources", "access-requests"):
        check(any(needle in p for p in paths), f"openapi.yaml documents {needle}")


if __name__ == "__main__":
    tests = [v for k, v in sorted(globals().items()) if k.startswith("test_") and callable(v)]
    for t in tests:
        try:
            t()
        except Exception as e:  # a crash is a failure with its reason
            check(False, f"{t.__name__} raised {type(e).__name__}: {e}")
    print(f"deploy checks: {len(tests)} groups, {len(FAILURES)} failures")
    sys.exit(1 if FAILURES else 0)

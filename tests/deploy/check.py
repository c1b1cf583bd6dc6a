"""Checks of the deployment artefacts (the Helm chart, the Dockerfile, the Terraform examples) and of
the protocol's OpenAPI file.

Renders the chart for the value sets an operator uses (defaults, the command line from the product
docs, existing secrets, Vault definitions, HA), validates every render against the Kubernetes
schemas (kubernetes-validate --strict), and asserts the RBAC and environment wiring a security
reviewer and an operator rely on. Lints the Dockerfile with hadolint and parses the Terraform.

Run: .venv-test/bin/python tests/deploy/check.py   (tests/run installs the tools)
"""

import glob
import os
import shlex
import subprocess
import sys
import tempfile

import hcl2
import helm_python as helm
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHART = os.path.join(ROOT, "deploy", "helm", "apono-connector")
BIN = os.path.dirname(sys.executable)
KUBE_VERSION = "1.33.0"
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


def values_from_command_line(command):
    """The values a `helm upgrade ...` command line sets, parsed as a shell and Helm would."""
    args = shlex.split(command)
    values = {}
    i = 0
    while i < len(args):
        if args[i] in ("--set", "--set-string"):
            parse = helm.parse_set_string if args[i] == "--set" else helm.parse_set_string_values
            merge(values, parse(args[i + 1]))
            i += 2
        else:
            i += 1
    return values


def render(values):
    chart = helm.Chart.load(CHART)
    out = chart.render(values=values, name="apono-connector", namespace="apono-connector", is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith(".yaml"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def kinds(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind):
    found = kinds(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def env_of(docs):
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container.get("env", [])}, container


def validate(name, docs):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump_all(docs, f)
        path = f.name
    result = subprocess.run(
        [os.path.join(BIN, "kubernetes-validate"), "-k", KUBE_VERSION, "--strict", path],
        capture_output=True,
        text=True,
    )
    os.unlink(path)
    check(result.returncode == 0, f"{name}: kubernetes-validate --strict: {result.stdout}{result.stderr}")


REQUIRED = {"apono": {"token": "tok-canary-123", "connectorId": "prod-connector"}}

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
    for values in (REQUIRED, values_from_command_line(DOCS_COMMAND)):
        result = helm.lint(CHART, values=values, strict=True)
        check(not result.get("errors"), f"helm lint --strict: {result}")


def test_defaults():
    docs = render(merge({}, REQUIRED))
    validate("defaults", docs)
    env, container = env_of(docs)
    check(env["APONO_CONNECTOR_ID"]["value"] == "prod-connector", "connector id wired")
    check(env["APONO_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "apono-connector", "key": "APONO_TOKEN"},
          "token comes from the chart's Secret")
    check(env["APONO_URL"]["value"], "APONO_URL set")
    check(env["APONO_HEALTH_ADDR"]["value"] == "0.0.0.0:8080", "health address")
    check("ALLOWED_SECRETS_TO_READ" not in env, "no allow-list by default")
    check(not kinds(docs, "ClusterRole") and not kinds(docs, "Role"), "no RBAC unless manageClusterRoles")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    check(pod["automountServiceAccountToken"] is False, "no API token mounted when the agent needs none")
    check(pod["securityContext"]["runAsNonRoot"] is True, "runAsNonRoot")
    sc = container["securityContext"]
    check(sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, "read-only root, no escalation")
    check(container["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness on /healthz")
    check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness on /readyz")
    check(container["args"] == ["run"], "runs the daemon")
    check(not kinds(docs, "PodDisruptionBudget"), "no PDB for one replica")
    deployment_text = yaml.safe_dump(one(docs, "Deployment"))
    check("tok-canary-123" not in deployment_text, "the token is not in the Deployment")


def test_docs_command_line():
    values = values_from_command_line(DOCS_COMMAND)
    docs = render(values)
    validate("docs command line", docs)
    env, _ = env_of(docs)
    check(env["ALLOWED_SECRETS_TO_READ"]["value"] == "secret1,secret2,secret3", "allow-list env from the command line")
    role = one(docs, "ClusterRole")
    check(role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                             "resourceNames": ["secret1", "secret2", "secret3"]}],
          f"RBAC is get on the three named secrets only: {role['rules']}")
    binding = one(docs, "ClusterRoleBinding")
    check(binding["subjects"][0]["name"] == one(docs, "ServiceAccount")["metadata"]["name"], "bound to the agent's SA")
    check(one(docs, "Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"] is True,
          "API token mounted when the agent reads secrets")


def test_terraform_form_of_the_list():
    # Apono's Terraform example sets "{secret1\,secret2\,secret3}", which Helm parses to ONE
    # list item holding commas: the chart must read the same three names.
    values = merge(merge({}, REQUIRED), helm.parse_set_string(r"allowedSecretsToRead={secret1\,secret2\,secret3}"))
    values["serviceAccount"] = {"manageClusterRoles": True}
    docs = render(values)
    check(one(docs, "ClusterRole")["rules"][0].get("resourceNames") == ["secret1", "secret2", "secret3"],
          "escaped-comma list gives three names")
    values["allowedSecretsToRead"] = []
    docs = render(values)
    rule = one(docs, "ClusterRole")["rules"][0]
    check(rule["verbs"] == ["get"] and "resourceNames" not in rule, "without a list: get on secrets, no names")


def test_existing_secrets_and_vault():
    values = {
        "apono": {"existingSecret": "my-apono-token", "existingSecretKey": "token", "connectorId": "c1"},
        "hashicorpVault": {"existingSecret": "vault-defs", "existingSecretKey": "vault.json"},
    }
    docs = render(values)
    validate("existing secrets", docs)
    env, container = env_of(docs)
    check(env["APONO_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "my-apono-token", "key": "token"},
          "token from the existing secret")
    check(not kinds(docs, "Secret"), "no Secret made when both are existing")
    check(env["HASHICORP_VAULT_CONFIG_FILE_PATH"]["value"] == "/etc/apono-connector/vault/vault.json", "vault file path")
    check("HASHICORP_VAULT_CONFIG" not in env, "vault definitions never in the environment")
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    check(volumes["vault-config"]["secret"]["secretName"] == "vault-defs", "vault secret mounted")

    inline = merge(merge({}, REQUIRED), {"hashicorpVault": {"config": '[{"address":"https://vault:8200","token":"hvs.canary"}]'}})
    docs = render(inline)
    validate("inline vault config", docs)
    secrets = {s["metadata"]["name"]: s for s in kinds(docs, "Secret")}
    check("apono-connector-vault" in secrets, "vault definitions stored in a Secret")
    check("hvs.canary" not in yaml.safe_dump(one(docs, "Deployment")), "vault token not in the Deployment")


def test_high_availability():
    values = merge(merge({}, REQUIRED), {"replicaCount": 3})
    docs = render(values)
    validate("HA", docs)
    check(one(docs, "Deployment")["spec"]["replicas"] == 3, "three replicas")
    pdb = one(docs, "PodDisruptionBudget")
    check(pdb["spec"]["minAvailable"] == 1, "PDB keeps one serving")


def test_missing_values_fail_clearly():
    for values, needle in (({"apono": {"connectorId": "c"}}, "apono.token"), ({"apono": {"token": "t"}}, "apono.connectorId")):
        try:
            render(values)
            check(False, f"render without {needle} must fail")
        except helm.HelmError as e:
            check(needle in str(e), f"error names {needle}: {e}")
    try:
        render(merge(merge({}, REQUIRED), {"replicaCount": "many"}))
        check(False, "schema rejects a non-integer replicaCount")
    except helm.HelmError:
        pass


def test_dockerfile():
    path = os.path.join(ROOT, "Dockerfile")
    result = subprocess.run([os.path.join(BIN, "hadolint"), path], capture_output=True, text=True)
    check(result.returncode == 0, f"hadolint: {result.stdout}{result.stderr}")
    text = open(path).read()
    lines = [l.strip() for l in text.splitlines()]
    check('ENTRYPOINT ["apono-connector"]' in text and 'CMD ["run"]' in text, "entrypoint and cmd")
    check("USER 65532" in text and "EXPOSE 8080" in text, "non-root user, port 8080")
    # Every base image is pinned by a digest of the right form (an ARG the FROM line uses).
    froms = [l for l in lines if l.startswith("FROM ")]
    check(len(froms) == 2 and all("@${" in l for l in froms), f"base images pinned by digest: {froms}")
    digests = [l.split("=", 1)[1] for l in lines if l.startswith("ARG ") and "_DIGEST=" in l]
    check(
        len(digests) == 2
        and all(d.startswith("sha256:") and len(d) == 71 and all(c in "0123456789abcdef" for c in d[7:]) for d in digests),
        f"digest ARGs are sha256 digests: {digests}",
    )
    # The probe needs no curl: the binary asks its own /readyz.
    check(
        any(l.startswith("HEALTHCHECK") for l in lines) and 'CMD ["apono-connector", "healthcheck"]' in text,
        "HEALTHCHECK runs `apono-connector healthcheck`",
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
    # The parser must reject broken HCL, or the check below proves nothing.
    try:
        hcl2.loads('resource "x" "y" { a = }')
        check(False, "the HCL parser accepts broken input")
    except Exception:
        pass
    files = sorted(glob.glob(os.path.join(ROOT, "deploy", "terraform", "*", "*.tf")))
    check(len(files) == 5, f"five Terraform examples: {files}")
    for path in files:
        with open(path) as f:
            text = f.read()
        try:
            parsed = hcl2.loads(text)
        except Exception as e:
            check(False, f"{path} does not parse: {e}")
            continue
        check("resource" in parsed and "output" in parsed, f"{path}: resources and an output")
        if "/vault/" not in path:
            check("apono-connector-read" in text, f"{path}: marks the secret for the agent")
        check("sensitive = true" in text, f"{path}: credentials are sensitive variables")


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

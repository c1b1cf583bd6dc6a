"""Checks of the Terraform examples in deploy/terraform (run by tests/deploy/check.py).

`terraform validate` needs the providers, which are not downloaded here, so the examples are
checked in these ways:

1. Syntax: python-hcl2 parses each file, and `escape_errors` (hcl_eval.py) finds what python-hcl2
   lets through but Terraform refuses: an escape other than \\n \\r \\t \\" \\\\ \\uNNNN
   \\UNNNNNNNN in a quoted string (the seed's "{a\\,b}"), or a quoted string running past its line.
2. Style: `terraform fmt -check -recursive` on a copy, when `terraform` is on PATH; the same binary
   then confirms that `escape_errors` agrees with it on a set of samples.
3. Meaning: hcl_eval.py evaluates each example for every setting of its switches, and the checks
   below assert what each store needs (README, "permissions the connector needs"): exactly those
   grants, the read mark only with the opt-in, a Vault definition list with a login the agent
   renews, no default control plane address. The Kubernetes example's values are rendered with
   the chart (real Helm engine) once the chart has `controlPlane`.
4. Each semantic check is itself checked: `MUTATIONS` breaks an example on purpose and the checks
   must then report a problem, so none of them passes vacuously.

With APONO_TEST_TF_PLUGIN_DIR naming a local provider mirror (the layout `terraform init
-plugin-dir` reads), the examples whose providers it holds also go through `terraform validate`;
with APONO_TEST_MOTO_SERVER too, the AWS example is applied to moto and what it made is read back.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile

import hcl2
import helm_python as helm
import yaml

from hcl_eval import EvalError, Module, Unknown, escape_errors, ref_target, to_string, unquote

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "deploy", "terraform")
MARK = "apono-connector-read"

# ---------------------------------------------------------------------------------------------
# 1. What each example must do (README "permissions the connector needs").

CREDENTIALS = {"rancher_access_key": "ak-sample", "rancher_secret_key": "sk-sample"}
SECRET_STORE_FIELDS = {
    "gcp": ("GCP", {"project", "secret_id"}),
    "azure": ("AZURE", {"vault_url", "name"}),
    "aws": ("AWS", {"region", "secret_id"}),
    "vault": ("HASHICORP_VAULT", {"secret_engine", "path"}),
    "kubernetes": ("KUBERNETES", {"namespace", "name"}),
}


def check_common(name, mod, ev):
    problems = []
    for var in CREDENTIALS:
        if mod.variables.get(var, {}).get("sensitive") is not True:
            problems.append(f"{name}: variable {var} must be sensitive (keeps the key out of plans and logs)")
    store_type, fields = SECRET_STORE_FIELDS[name]
    if "secret_store" not in mod.outputs:
        return problems + [f"{name}: no output secret_store (the integration's secret_store JSON)"]
    store = json.loads(ev.value(mod.outputs["secret_store"]["value"]))
    if store.get("type") != store_type or set(store) - {"type"} != fields:
        problems.append(f"{name}: secret_store output {store} is not {{type: {store_type}, {', '.join(sorted(fields))}}}")
    return problems


GCP_ROLES = {
    "roles/secretmanager.secretAccessor": {"secretmanager.versions.access"},
    "roles/secretmanager.viewer": {
        "secretmanager.secrets.get", "secretmanager.secrets.list", "secretmanager.versions.get",
        "secretmanager.versions.list", "secretmanager.locations.get", "secretmanager.locations.list",
    },
    "roles/secretmanager.admin": {"secretmanager.*"},
}


def check_gcp(mod):
    problems = []
    base = dict(CREDENTIALS, project="p1", agent_service_account="agent@p1.iam.gserviceaccount.com")
    if "require_read_mark" not in mod.variables:
        return ["gcp: no variable require_read_mark (the opt-in APONO_REQUIRE_READ_MARK=GCP)"]
    for mark in (False, True):
        ev = mod.evaluate(**base, require_read_mark=mark)
        where = f"gcp (require_read_mark={str(mark).lower()})"
        if mark is False:
            problems += check_common("gcp", mod, ev)
        granted = set()
        for rtype in ("google_secret_manager_secret_iam_member", "google_secret_manager_secret_iam_binding"):
            for rname, body in ev.active(rtype):
                role = ev.attr(body, "role")
                members = [ev.attr(body, "member")] if "member" in body else ev.attr(body, "members", [])
                if members != [f"serviceAccount:{base['agent_service_account']}"]:
                    problems.append(f"{where}: {rtype}.{rname} grants to {members}, not the agent's service account")
                if (ref_target(ev.attr(body, "secret_id")) or ("",))[0] != "google_secret_manager_secret":
                    problems.append(f"{where}: {rtype}.{rname} is not on the example's secret")
                target = ref_target(role)
                if target and target[0] == "google_project_iam_custom_role":
                    if ev.count(*target) == 0:
                        problems.append(f"{where}: {rtype}.{rname} uses custom role {target[1]}, which is not created")
                        continue
                    granted |= set(ev.attr(ev.module.resources[target], "permissions"))
                elif role in GCP_ROLES:
                    granted |= GCP_ROLES[role]
                else:
                    problems.append(f"{where}: {rtype}.{rname} grants {role!r}, a role this check does not know")
        for rtype in ("google_project_iam_member", "google_project_iam_binding", "google_project_iam_policy"):
            if ev.active(rtype):
                problems.append(f"{where}: grants at project level ({rtype}); the agent needs access to one secret")
        want = {"secretmanager.versions.access"} | ({"secretmanager.secrets.get"} if mark else set())
        if granted != want:
            problems.append(f"{where}: the agent is granted {sorted(granted)}; it needs exactly {sorted(want)}")
        secrets = ev.active("google_secret_manager_secret")
        labels = ev.attr(secrets[0][1], "labels", {}) if secrets else {}
        if (labels.get(MARK) == "true") != mark:
            problems.append(f"{where}: the secret {'lacks' if mark else 'carries'} the label {MARK}=true")
    return problems


AZURE_ROLES = {  # data actions on secrets, short names
    "Key Vault Secrets User": {"getSecret", "readMetadata"},
    "Key Vault Reader": {"readMetadata"},
    "Key Vault Secrets Officer": {"getSecret", "readMetadata", "setSecret", "delete", "backup", "restore", "purge", "recover"},
    "Key Vault Administrator": {"*"},
}
AZURE_POLICY_PERMISSIONS = {"Get": "getSecret", "List": "readMetadata"}


def check_azure(mod):
    problems = []
    principal = "00000000-0000-0000-0000-0000000000a1"
    base = dict(CREDENTIALS, key_vault_name="kv1", key_vault_resource_group_name="rg1", agent_principal_id=principal)
    for var in ("require_read_mark", "permission_model", "agent_principal_id"):
        if var not in mod.variables:
            problems.append(f"azure: no variable {var}")
    if "subscription_id" not in mod.providers.get("azurerm", {}):
        problems.append("azure: the azurerm provider does not take subscription_id (azurerm 4.x requires it, or ARM_SUBSCRIPTION_ID)")
    if problems:
        return problems
    for model in ("rbac", "access_policy"):
        for mark in (False, True):
            ev = mod.evaluate(**base, permission_model=model, require_read_mark=mark)
            where = f"azure ({model}, require_read_mark={str(mark).lower()})"
            if (model, mark) == ("rbac", False):
                problems += check_common("azure", mod, ev)
            assignments = ev.active("azurerm_role_assignment")
            policies = ev.active("azurerm_key_vault_access_policy")
            granted = set()
            for rname, body in assignments:
                role = ev.attr(body, "role_definition_name")
                scope = ev.attr(body, "scope")
                if ev.attr(body, "principal_id") != principal:
                    problems.append(f"{where}: azurerm_role_assignment.{rname} is not for agent_principal_id")
                if not (isinstance(scope, Unknown) and scope.path.startswith("azurerm_key_vault_secret.")):
                    problems.append(f"{where}: azurerm_role_assignment.{rname} is scoped to {scope!r}, not to the secret")
                granted |= AZURE_ROLES.get(role, {f"unknown role {role}"})
            for rname, body in policies:
                if ev.attr(body, "object_id") != principal:
                    problems.append(f"{where}: azurerm_key_vault_access_policy.{rname} is not for agent_principal_id")
                for p in ev.attr(body, "secret_permissions", []):
                    granted.add(AZURE_POLICY_PERMISSIONS.get(p, p))
                for kind in ("key_permissions", "certificate_permissions", "storage_permissions"):
                    if ev.attr(body, kind):
                        problems.append(f"{where}: the access policy also grants {kind}")
            if model == "rbac" and (policies or not assignments):
                problems.append(f"{where}: an RBAC vault needs a role assignment and no access policy")
            if model == "access_policy" and (assignments or not policies):
                problems.append(f"{where}: an access-policy vault needs an access policy and no role assignment")
            need = {"getSecret"} | ({"readMetadata"} if mark else set())
            # RBAC: Key Vault Secrets User is the narrowest built-in role that reads a value, and
            # it holds readMetadata too. An access policy can be exact.
            allowed = {"getSecret", "readMetadata"} if model == "rbac" else need
            if not need <= granted or not granted <= allowed:
                problems.append(f"{where}: the agent is granted {sorted(granted)}; it needs {sorted(need)}")
            secrets = ev.active("azurerm_key_vault_secret")
            tags = ev.attr(secrets[0][1], "tags", {}) if secrets else {}
            if (tags.get(MARK) == "true") != mark:
                problems.append(f"{where}: the secret {'lacks' if mark else 'carries'} the tag {MARK}=true")
    return problems


def check_aws(mod):
    problems = []
    base = dict(CREDENTIALS, region="eu-west-1")
    for var in ("agent_role_name", "kms_key_arn"):
        if var not in mod.variables:
            problems.append(f"aws: no variable {var}")
    if problems:
        return problems
    key = "arn:aws:kms:eu-west-1:111122223333:key/k1"
    for role in (None, "agent-role"):
        for kms in (None, key):
            ev = mod.evaluate(**base, agent_role_name=role, kms_key_arn=kms)
            where = f"aws (agent_role_name={role}, kms_key_arn={'set' if kms else 'null'})"
            if (role, kms) == (None, None):
                problems += check_common("aws", mod, ev)
            policies = ev.active("aws_iam_policy")
            if len(policies) != 1:
                problems.append(f"{where}: expected one aws_iam_policy, found {len(policies)}")
                continue
            pname, pbody = policies[0]
            name = pbody.get("name")
            if isinstance(name, str) and name.startswith('"') and "${" not in name:
                problems.append(f"{where}: the policy's fixed name {name} collides on a second apply in the account (use name_prefix)")
            statements = json.loads(ev.attr(pbody, "policy"))["Statement"]
            actions = set()
            for st in statements:
                acts = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
                actions |= set(acts)
                if any(a.startswith("secretsmanager:") for a in acts):
                    cond = st.get("Condition", {}).get("StringEquals", {})
                    if not any(k.endswith(f"ResourceTag/{MARK}") and v == "true" for k, v in cond.items()):
                        problems.append(f"{where}: {acts} are not limited to secrets tagged {MARK}=true")
                if "kms:Decrypt" in acts and st.get("Resource") != kms:
                    problems.append(f"{where}: kms:Decrypt on {st.get('Resource')!r}, not on the given key")
            want = {"secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue"} | ({"kms:Decrypt"} if kms else set())
            if actions != want:
                problems.append(f"{where}: the policy allows {sorted(actions)}; the agent needs exactly {sorted(want)}")
            attachments = [b for _, b in ev.active("aws_iam_role_policy_attachment")
                           if ref_target(ev.attr(b, "policy_arn")) == ("aws_iam_policy", pname)]
            if role is not None and [ev.attr(b, "role") for b in attachments] != [role]:
                problems.append(f"{where}: the policy is not attached to the role named by agent_role_name")
            if role is None and attachments:
                problems.append(f"{where}: the policy is attached although no role was named")
            outputs = [ev.value(o["value"]) for o in mod.outputs.values()]
            if role is None and Unknown(f"aws_iam_policy.{pname}.arn") not in outputs:
                problems.append(f"{where}: the policy is neither attached nor its ARN output")
            secret = ev.active("aws_secretsmanager_secret")[0][1]
            if ev.attr(secret, "tags", {}).get(MARK) != "true":
                problems.append(f"{where}: the secret is not tagged {MARK}=true")
            if ev.attr(secret, "kms_key_id") != kms:
                problems.append(f"{where}: the secret is not encrypted with kms_key_arn")
    return problems


def _vault_policy_paths(text):
    paths = {}
    for block in hcl2.loads(text).get("path", []):
        for path, body in block.items():
            paths[unquote(path)] = [unquote(c) for c in body["capabilities"]]
    return paths


def check_vault(mod):
    problems = []
    address = "https://vault.example.test:8200"
    base = dict(CREDENTIALS, vault_address=address)
    if "auth_method" not in mod.variables:
        return ["vault: no variable auth_method (approle or kubernetes)"]
    for method in ("approle", "kubernetes"):
        for namespace in (None, "admin"):
            ev = mod.evaluate(**base, auth_method=method, vault_namespace=namespace)
            where = f"vault (auth_method={method}, vault_namespace={namespace})"
            if (method, namespace) == ("approle", None):
                problems += check_common("vault", mod, ev)
            if ev.active("vault_token"):
                problems.append(f"{where}: makes a vault_token, which the agent never renews: it stops working at its TTL")
            output = mod.outputs.get("hashicorp_vault_config")
            if output is None:
                problems.append(f"{where}: no output hashicorp_vault_config")
                continue
            if output.get("sensitive") is not True:
                problems.append(f"{where}: output hashicorp_vault_config must be sensitive (it holds the login)")
            definitions = json.loads(ev.value(output["value"]))
            if not isinstance(definitions, list) or len(definitions) != 1 or not isinstance(definitions[0], dict):
                problems.append(f"{where}: HASHICORP_VAULT_CONFIG must be a JSON list of one definition, got {definitions!r}")
                continue
            d = definitions[0]
            if d.get("address") != address:
                problems.append(f"{where}: the definition's address is {d.get('address')!r}, not vault_address")
            if d.get("namespace") != namespace:
                problems.append(f"{where}: the definition's namespace is {d.get('namespace')!r}, expected {namespace!r}")
            if "token" in d or d.get("auth") != method:
                problems.append(f"{where}: the definition must log in with {method} (which the agent renews), got {d}")
            kind = "vault_approle_auth_backend_role" if method == "approle" else "vault_kubernetes_auth_backend_role"
            roles = ev.active(kind)
            if len(roles) != 1:
                problems.append(f"{where}: expected one {kind}, found {len(roles)}")
                continue
            role = roles[0][1]
            if ev.attr(role, "token_type", "default") == "batch":
                problems.append(f"{where}: batch tokens cannot be renewed")
            policies = ev.attr(role, "token_policies", [])
            if [ref_target(p) for p in policies] != [("vault_policy", n) for n, _ in ev.active("vault_policy")]:
                problems.append(f"{where}: the login's token_policies {policies} are not the example's read policy")
            expected = ({"auth", "mount", "role_id", "secret_id"} if method == "approle" else {"auth", "mount", "role"})
            expected |= {"address"} | ({"namespace"} if namespace else set())
            if set(d) != expected:
                problems.append(f"{where}: the definition has fields {sorted(d)}, expected {sorted(expected)}")
            if method == "approle":
                # The agent logs in again with the same secret_id whenever a token reaches its max
                # TTL: a secret_id that expires or runs out of uses stops it.
                for field in ("secret_id_ttl", "secret_id_num_uses"):
                    if ev.attr(role, field) != 0:
                        problems.append(f"{where}: {field} must be 0 (unlimited), or the agent's next login fails")
                for _, sid in ev.active("vault_approle_auth_backend_role_secret_id"):
                    if ev.attr(sid, "ttl", 0) or ev.attr(sid, "num_uses", 0):
                        problems.append(f"{where}: the secret_id expires or runs out of uses")
            else:
                if d.get("role") not in (ev.attr(role, "role_name"), f"<{kind}.{roles[0][0]}[0].role_name>"):
                    problems.append(f"{where}: the definition's role is not the Kubernetes auth role")
        mount, path = ev.var("mount"), ev.var("path")
        for _, policy in ev.active("vault_policy"):
            paths = _vault_policy_paths(ev.attr(policy, "policy"))
            allowed = {f"{mount}/data/{path}": ["read"], f"sys/internal/ui/mounts/{mount}": ["read"]}
            if paths.get(f"{mount}/data/{path}") != ["read"] or any(allowed.get(p) != c for p, c in paths.items()):
                problems.append(f"vault: the policy grants {paths}; the agent needs read on {mount}/data/{path} only")
    return problems


def _set_values(ev, release):
    """The chart values a helm_release's `set` blocks give, parsed as the helm provider does."""
    values = {}
    for block in release.get("set", []) + release.get("set_sensitive", []):
        name, value = ev.attr(block, "name"), ev.attr(block, "value")
        text = f"{name}={to_string(value)}"
        try:
            parsed = helm.parse_set_string_values(text) if ev.attr(block, "type") == "string" else helm.parse_set_string(text)
        except Exception as e:  # helm_python's parse errors
            raise EvalError(f"Helm refuses the value of set {name!r}: {e}") from e
        _deep_merge(values, parsed)
    return values


def _deep_merge(a, b):
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _deep_merge(a[k], v)
        else:
            a[k] = v


def _admits(constraint, version):
    """Whether a Terraform version constraint ("~> 2.32", ">= 1.0, < 3.0", "2.15.0") admits a version."""
    v = tuple(int(x) for x in version.split("."))
    for part in constraint.split(","):
        op, want = re.match(r"\s*(~>|>=|<=|!=|=|>|<)?\s*([\d.]+)\s*$", part).groups()
        w = tuple(int(x) for x in want.split("."))
        pad = lambda t: t + (0,) * (3 - len(t))  # noqa: E731
        if op == "~>":
            upper = w[:-1][:-1] + (w[:-1][-1] + 1,) if len(w) > 1 else (w[0] + 1,)
            ok = pad(v) >= pad(w) and pad(v) < pad(upper)
        else:
            ok = {None: v == w, "=": v == w, "!=": v != w, ">=": pad(v) >= pad(w), "<=": pad(v) <= pad(w),
                  ">": pad(v) > pad(w), "<": pad(v) < pad(w)}[op]
        if not ok:
            return False
    return True


def check_kubernetes(mod):
    problems = []
    url_var = mod.variables.get("apono_url")
    if url_var is None or "control_plane_in_cluster" not in mod.variables:
        return ["kubernetes: needs variables apono_url and control_plane_in_cluster"]
    if url_var.get("default") is not None:
        problems.append(f"kubernetes: apono_url defaults to {url_var['default']}: the token would go there unasked")
    base = dict(CREDENTIALS, connector_id="c1", image_registry="registry.example.test", apono_token="t0ken")
    releases = [n for (t, n) in mod.resources if t == "helm_release"]
    if len(releases) != 1:
        return problems + [f"kubernetes: expected one helm_release, found {releases}"]
    release_name = releases[0]
    release = mod.resources[("helm_release", release_name)]
    cases = [  # (apono_url, in-cluster control plane, must the plan be refused)
        (None, False, True),
        (None, True, False),
        ("https://control-plane.example.test", False, False),
    ]
    for url, in_cluster, refused in cases:
        ev = mod.evaluate(**base, apono_url=url, control_plane_in_cluster=in_cluster,
                          other_allowed_secrets=["team-b/other-key"])
        where = f"kubernetes (apono_url={url}, control_plane_in_cluster={str(in_cluster).lower()})"
        if (url, in_cluster) == cases[2][:2]:
            problems += check_common("kubernetes", mod, ev)
        failing = [msg for holds, msg in ev.preconditions("helm_release", release_name) if holds is False]
        if refused and not failing:
            problems.append(f"{where}: the plan goes ahead with no control plane address")
        if not refused and failing:
            problems.append(f"{where}: refused: {failing}")
        if refused:
            continue
        values = _set_values(ev, release)
        if values.get("controlPlane", {}).get("enabled") is not in_cluster:
            problems.append(f"{where}: controlPlane.enabled is {values.get('controlPlane')}, expected {in_cluster}")
        if (values.get("apono", {}).get("url") or None) != url:
            problems.append(f"{where}: apono.url is {values.get('apono', {}).get('url')!r}")
        listed = values.get("allowedSecretsToRead")
        # The chart splits items on commas, as Apono's "{a\,b}" form needs.
        names = [x.strip() for item in listed for x in item.split(",")] if isinstance(listed, list) else listed
        if names != [ev.var("secret_name"), "team-b/other-key"]:
            problems.append(f"{where}: Helm reads allowedSecretsToRead as {listed!r}, not the example's secret and other_allowed_secrets")
        if values.get("serviceAccount", {}).get("manageClusterRoles") is not True:
            problems.append(f"{where}: serviceAccount.manageClusterRoles is not true: the agent may read no Secret")
    # Apono's SaaS address, as Apono's modules set it, is refused as the chart refuses it (deploy
    # review N1); an explicit allow_apono_host lets it through, and look-alikes are not caught.
    for url, allow, refused in (("api.apono.io", False, True), ("https://Agents.Apono.IO:443/connector", False, True),
                                ("eu.agents.apono.io.", False, True), ("api.apono.io", True, False),
                                ("notapono.io", False, False), ("https://apono.io.example.com", False, False)):
        ev = mod.evaluate(**base, apono_url=url, control_plane_in_cluster=False, allow_apono_host=allow)
        failing = [msg for holds, msg in ev.preconditions("helm_release", release_name) if holds is False]
        if refused != any("Apono's service" in m for m in failing):
            problems.append(f"kubernetes (apono_url={url}, allow_apono_host={str(allow).lower()}): "
                            f"{'not refused' if refused else 'refused'}: {failing}")
        if not refused and _set_values(ev, release).get("apono", {}).get("allowAponoHost") is not allow:
            problems.append(f"kubernetes: allow_apono_host={allow} is not passed as apono.allowAponoHost")
    ev = mod.evaluate(**base, apono_url="cp.example.test", allowed_rancher_hosts=["rancher.example.com", "r2.example.com:8443"])
    if _set_values(ev, release).get("allowedRancherHosts") != ["rancher.example.com", "r2.example.com:8443"]:
        problems.append(f"kubernetes: allowed_rancher_hosts reaches the chart as {_set_values(ev, release).get('allowedRancherHosts')!r}")
    ev = mod.evaluate(**dict(base, apono_token=None), apono_url="https://cp.example.test", apono_token_secret="apono-token")
    values = _set_values(ev, release)
    if values.get("apono", {}).get("existingSecret") != "apono-token" or values["apono"].get("token"):
        problems.append(f"kubernetes: with apono_token_secret the chart must get apono.existingSecret and no token, got {values.get('apono')}")
    if [m for holds, m in ev.preconditions("helm_release", release_name) if holds is False]:
        problems.append("kubernetes: apono_token_secret alone (without apono_token) is refused")
    if ev.attr(release, "create_namespace") is not True or any(t == "kubernetes_namespace" for t, _ in mod.resources):
        problems.append("kubernetes: the namespace must come from the release's create_namespace (a kubernetes_namespace fails where it exists)")
    secrets = [b for (t, _), b in mod.resources.items() if t in ("kubernetes_secret", "kubernetes_secret_v1")]
    if not secrets or ev.value(secrets[0]["metadata"][0].get("labels", "${{}}")).get(MARK) != "true":
        problems.append(f"kubernetes: the Secret is not labelled {MARK}=true")
    pins = mod.required_providers
    if not _admits(pins.get("kubernetes", {}).get("version", "0"), "2.32.0"):
        problems.append("kubernetes: the kubernetes provider constraint excludes the seed's 2.32.0")
    helm_pin = pins.get("helm", {}).get("version", "0")
    if not _admits(helm_pin, "2.15.0") or _admits(helm_pin, "3.0.0"):
        problems.append("kubernetes: the helm provider constraint must admit the seed's 2.15.0 and not 3.x (set {} blocks)")
    return problems


CHART = os.path.join(ROOT, "deploy", "helm", "apono-connector")


def kubernetes_chart_problems(mod):
    """Renders the chart with the values the Kubernetes example sets (real Helm engine), and checks
    that the agent may `get` exactly the listed Secrets, each in its namespace."""
    release = next(b for (t, _), b in mod.resources.items() if t == "helm_release")
    namespace = "apono-connector"
    problems = []
    cases = [  # (apono_url, in-cluster control plane, token variables)
        ("https://control-plane.example.test", False, {"apono_token": "t0ken"}),
        (None, True, {"apono_token": "t0ken"}),
        ("https://control-plane.example.test", False, {"apono_token_secret": "apono-token"}),
    ]
    for url, in_cluster, token in cases:
        where = (f"kubernetes example in the chart (apono_url={url}, control_plane_in_cluster={str(in_cluster).lower()}, "
                 f"{', '.join(token)})")
        ev = mod.evaluate(**CREDENTIALS, **token, connector_id="c1", image_registry="registry.example.test",
                          apono_url=url, control_plane_in_cluster=in_cluster, namespace=namespace,
                          other_allowed_secrets=["team-b/other-key"])
        try:
            out = helm.Chart.load(CHART).render(values=_set_values(ev, release), name="apono-connector",
                                                namespace=namespace, is_install=True)
        except Exception as e:  # helm_python.HelmError: the chart refused the values
            problems.append(f"{where}: the chart refuses the example's values: {e}")
            continue
        docs = [d for path, text in out.items() if path.endswith(".yaml") for d in yaml.safe_load_all(text) if d]
        granted = set()
        for doc in docs:
            for rule in doc.get("rules", []) if doc.get("kind") in ("Role", "ClusterRole") else []:
                if "secrets" not in rule.get("resources", []):
                    continue
                if doc["kind"] == "ClusterRole" or not rule.get("resourceNames"):
                    names = rule.get("resourceNames") or "every Secret"
                    problems.append(f"{where}: {doc['kind']} {doc['metadata']['name']} grants {rule.get('verbs')} on {names} in every namespace")
                    continue
                ns = doc["metadata"].get("namespace", namespace)
                granted |= {(ns, n) for n in rule["resourceNames"]}
        want = {(namespace, ev.var("secret_name")), ("team-b", "other-key")}
        if granted != want:
            problems.append(f"{where}: the agent may get Secrets {sorted(granted)}, expected {sorted(want)}")
    return problems


CHECKS = {"gcp": check_gcp, "azure": check_azure, "aws": check_aws, "vault": check_vault, "kubernetes": check_kubernetes}


def problems_of(name, text):
    """Everything wrong with one example's text: syntax, escapes, meaning."""
    problems = [f"{name}/main.tf:{line}:{col}: {msg}" for line, col, msg in escape_errors(text)]
    try:
        mod = Module(name, text)
    except Exception as e:  # python-hcl2 raises lark errors of several kinds
        return problems + [f"{name}/main.tf does not parse: {e}"]
    try:
        problems += CHECKS[name](mod)
    except (EvalError, KeyError, TypeError, ValueError) as e:
        problems.append(f"{name}: cannot evaluate the example: {type(e).__name__}: {e}")
    return problems


# ---------------------------------------------------------------------------------------------
# 2. Each semantic check must fail when its point breaks: (example, [(old, new)], what breaks).

SEED_LIST = 'value = "{secret1\\,secret2\\,secret3}"'

MUTATIONS = [
    ("gcp", [('role      = "roles/secretmanager.secretAccessor"', 'role      = "roles/secretmanager.viewer"')],
     "GCP: a role without versions.access"),
    ("gcp", [("count     = var.require_read_mark ? 1 : 0\n  secret_id", "count     = 1\n  secret_id")],
     "GCP: secrets.get granted without the opt-in"),
    ("gcp", [("labels = var.require_read_mark ?", "labels = true ?")], "GCP: the label without the opt-in"),
    ("gcp", [('permissions = ["secretmanager.secrets.get"]', 'permissions = ["secretmanager.secrets.get", "secretmanager.versions.list"]')],
     "GCP: the opt-in role grants more than secrets.get"),
    ("azure", [('role_definition_name = "Key Vault Secrets User"', 'role_definition_name = "Key Vault Reader"')],
     "Azure: no read role"),
    ("azure", [("scope                = azurerm_key_vault_secret.rancher_api_key.resource_versionless_id",
                "scope                = data.azurerm_key_vault.vault.id")], "Azure: the role on the whole vault"),
    ("azure", [('var.require_read_mark ? ["Get", "List"] : ["Get"]', '["Get"]')],
     "Azure: access policy without List under the opt-in"),
    ("azure", [("  subscription_id = var.subscription_id\n", "")], "Azure: azurerm 4.x without subscription_id"),
    ("aws", [("count      = var.agent_role_name == null ? 0 : 1", "count      = 0")], "AWS: the policy not attached"),
    ("aws", [('name_prefix = "apono-connector-read-"', 'name        = "apono-connector-read"')],
     "AWS: a fixed policy name"),
    ("aws", [("var.kms_key_arn == null ? [] : [local.decrypt_with_customer_key]", "[]")],
     "AWS: no kms:Decrypt for a customer key"),
    ("aws", [('"secretsmanager:ResourceTag/apono-connector-read" = "true"', '"secretsmanager:ResourceTag/team" = "x"')],
     "AWS: reads untagged secrets"),
    ("aws", [('output "read_policy_arn"', 'output "unrelated"'), ("value       = aws_iam_policy.apono_connector_read.arn", 'value       = "x"')],
     "AWS: no role named and no ARN output"),
    ("vault", [("value = jsonencode([\n", "value = jsonencode(\n"), ("\n  ])\n}", "\n  )\n}")],
     "Vault: a definition object instead of a list"),
    ("vault", [("secret_id_ttl      = 0", "secret_id_ttl      = 3600")], "Vault: a secret_id that expires"),
    ("vault", [('token_type     = "service"', 'token_type     = "batch"')], "Vault: batch (non-renewable) tokens"),
    ("vault", [('auth      = "approle"', 'token     = "hvs.sample"')], "Vault: a plain token instead of a login"),
    ("kubernetes", [('default     = null\n  description = "Address of the control plane',
                     'default     = "api.apono.io"\n  description = "Address of the control plane')],
     "Kubernetes: a default control plane address"),
    ("kubernetes", [("condition     = local.apono_url_given != var.control_plane_in_cluster",
                     "condition     = true")], "Kubernetes: no address and no in-cluster control plane accepted"),
    ("kubernetes", [('"{${join(",", local.allowed_secrets)}}"', 'join(",", local.allowed_secrets)')],
     "Kubernetes: the list without Helm's braces"),
    ("kubernetes", [("create_namespace = true", "create_namespace = false")], "Kubernetes: no create_namespace"),
    ("kubernetes", [("condition     = !local.apono_url_is_apono || var.allow_apono_host", "condition     = true")],
     "Kubernetes: Apono's SaaS address accepted"),
    ("kubernetes", [('value = var.apono_token_secret == null ? "" : var.apono_token_secret', 'value = ""')],
     "Kubernetes: apono_token_secret not passed as apono.existingSecret"),
    ("kubernetes", [("value = local.allowed_secrets_value", SEED_LIST)], "Kubernetes: the seed's invalid escape"),
]


def mutation_failures(texts):
    """Mutations that the checks did not notice (each is a check that cannot fail)."""
    missed = []
    for name, edits, what in MUTATIONS:
        text = texts[name]
        for old, new in edits:
            if old not in text:
                missed.append(f"mutation '{what}': {old!r} is no longer in {name}/main.tf: update MUTATIONS")
                break
            text = text.replace(old, new, 1)
        else:
            if not problems_of(name, text):
                missed.append(f"mutation '{what}': the checks still pass, so they do not guard it")
    return missed


# ---------------------------------------------------------------------------------------------
# 3. Terraform itself, when it is installed.

ESCAPE_SAMPLES = {  # quoted string -> valid in Terraform
    '"{a\\,b}"': False, '"{a\\\\,b}"': True, '"\\u00e9"': True, '"\\u00e"': False, '"\\U0001F600"': True,
    '"$${x}"': True, '"%%{x}"': True, '"a${"\\q"}b"': False, '"\\x41"': False, '"tab\\tquote\\""': True,
    '"a\nb"': False, '"a${\n1}b"': True,
}


def terraform_problems(tf):
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "terraform")
        shutil.copytree(EXAMPLES, copy, ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*"))
        run = subprocess.run([tf, "fmt", "-check", "-recursive", "-diff", "-no-color", copy], capture_output=True, text=True)
        if run.returncode != 0:
            problems.append(f"terraform fmt -check: not formatted or not parsed:\n{run.stdout}{run.stderr}")
    for sample, valid in ESCAPE_SAMPLES.items():
        run = subprocess.run([tf, "fmt", "-no-color", "-"], input=f"x = {sample}\n", capture_output=True, text=True)
        if (run.returncode == 0) != valid:
            problems.append(f"terraform says {sample} is {'valid' if run.returncode == 0 else 'invalid'}; ESCAPE_SAMPLES is wrong")
        if (not escape_errors(f"x = {sample}\n")) != valid:
            problems.append(f"escape_errors disagrees with Terraform on {sample}")
    return problems


def validate_problems(tf, plugin_dir):
    """`terraform validate` of each example whose providers the local mirror holds; the AWS one is
    also applied to moto when APONO_TEST_MOTO_SERVER names it."""
    problems, done = [], []
    hashicorp = os.path.join(plugin_dir, "registry.terraform.io", "hashicorp")
    held = set(os.listdir(hashicorp)) if os.path.isdir(hashicorp) else set()
    for name in sorted(CHECKS):
        with open(os.path.join(EXAMPLES, name, "main.tf")) as f:
            mod = Module(name, f.read())
        if not set(mod.required_providers) <= held:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(os.path.join(EXAMPLES, name, "main.tf"), tmp)
            for step in (["init", "-backend=false", "-input=false", f"-plugin-dir={plugin_dir}"], ["validate"]):
                run = subprocess.run([tf, f"-chdir={tmp}", *step, "-no-color"], capture_output=True, text=True)
                if run.returncode != 0:
                    problems.append(f"terraform {step[0]} {name}: {run.stdout}{run.stderr}")
                    break
            else:
                done.append(f"{name} validated")
                if name == "aws" and os.environ.get("APONO_TEST_MOTO_SERVER"):
                    found = aws_apply_problems(tf, tmp)
                    problems += found
                    done.append("aws applied to moto" + (" (with problems)" if found else ""))
    return problems, done


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aws_apply_problems(tf, workdir):
    """Applies the AWS example to moto (a real Secrets Manager, IAM and KMS API) with a role and a
    customer key, then reads back what it made; a second copy in the same account must not collide."""
    import time
    import urllib.request

    try:
        import boto3
    except ImportError:
        return ["aws on moto: boto3 is not installed next to moto (pip install 'moto[server]')"]
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([os.environ["APONO_TEST_MOTO_SERVER"], "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    problems = []
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                   AWS_REGION="eu-west-1")
        session = boto3.session.Session(aws_access_key_id="test", aws_secret_access_key="test", region_name="eu-west-1")
        iam = session.client("iam", endpoint_url=endpoint)
        iam.create_role(RoleName="agent-role", AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": []}))
        key = session.client("kms", endpoint_url=endpoint).create_key()["KeyMetadata"]["Arn"]
        second = os.path.join(workdir, "second")
        os.makedirs(second)
        shutil.copy(os.path.join(workdir, "main.tf"), second)
        shutil.copytree(os.path.join(workdir, ".terraform"), os.path.join(second, ".terraform"), symlinks=True)
        shutil.copy(os.path.join(workdir, ".terraform.lock.hcl"), second)
        for where, extra in ((workdir, ["-var", "agent_role_name=agent-role", "-var", f"kms_key_arn={key}"]),
                             (second, ["-var", "secret_name=rancher-api-key-2", "-var", "agent_role_name=agent-role"])):
            run = subprocess.run([tf, f"-chdir={where}", "apply", "-auto-approve", "-input=false", "-no-color",
                                  "-var", "region=eu-west-1", "-var", "rancher_access_key=ak-sample",
                                  "-var", "rancher_secret_key=sk-sample", *extra], capture_output=True, text=True, env=env)
            if run.returncode != 0:
                return [f"aws on moto: terraform apply failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"]
        sm = session.client("secretsmanager", endpoint_url=endpoint)
        meta = sm.describe_secret(SecretId="rancher-api-key")
        if {"Key": MARK, "Value": "true"} not in meta.get("Tags", []):
            problems.append(f"aws on moto: the secret's tags are {meta.get('Tags')}")
        if meta.get("KmsKeyId") != key:
            problems.append(f"aws on moto: the secret is encrypted with {meta.get('KmsKeyId')!r}, not the given key")
        if set(json.loads(sm.get_secret_value(SecretId="rancher-api-key")["SecretString"])) != {"access_key", "secret_key"}:
            problems.append("aws on moto: the secret does not hold access_key and secret_key")
        attached = iam.list_attached_role_policies(RoleName="agent-role")["AttachedPolicies"]
        if len(attached) != 2:
            problems.append(f"aws on moto: two applies should attach two policies to the role, found {attached}")
        for policy in attached:
            version = iam.get_policy(PolicyArn=policy["PolicyArn"])["Policy"]["DefaultVersionId"]
            doc = iam.get_policy_version(PolicyArn=policy["PolicyArn"], VersionId=version)["PolicyVersion"]["Document"]
            doc = json.loads(doc) if isinstance(doc, str) else doc
            actions = {a for st in doc["Statement"] for a in (st["Action"] if isinstance(st["Action"], list) else [st["Action"]])}
            if not {"secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue"} <= actions:
                problems.append(f"aws on moto: policy {policy['PolicyName']} allows {sorted(actions)}")
    finally:
        server.terminate()
        server.wait(timeout=10)
    return problems


def run(check):
    """Runs every Terraform check, reporting each problem through check(False, message)."""
    check(escape_errors('value = "{secret1\\,secret2\\,secret3}"\n'), "the escape check refuses the seed's \"{a\\,b}\"")
    check(not escape_errors('value = "{secret1\\\\,secret2\\\\,secret3}"\n'), "the escape check accepts \"{a\\\\,b}\"")
    check(not escape_errors('p = <<-EOT\n  a\\,b "${var.x}"\n  EOT\n'), "backslashes in a heredoc are literal")
    try:
        hcl2.loads('resource "x" "y" { a = }')
        check(False, "the HCL parser accepts broken input")
    except Exception:
        pass
    texts = {}
    for name in sorted(CHECKS):
        path = os.path.join(EXAMPLES, name, "main.tf")
        check(os.path.exists(path), f"example {path} exists")
        if os.path.exists(path):
            with open(path) as f:
                texts[name] = f.read()
    found = sorted(os.path.relpath(os.path.join(d, f), EXAMPLES) for d, _, fs in os.walk(EXAMPLES) for f in fs if f.endswith(".tf"))
    check(found == [f"{n}/main.tf" for n in sorted(CHECKS)], f"the Terraform files are the five checked examples: {found}")
    for name, text in texts.items():
        for problem in problems_of(name, text):
            check(False, problem)
    for missed in mutation_failures(texts):
        check(False, missed)
    if "kubernetes" in texts:
        for problem in kubernetes_chart_problems(Module("kubernetes", texts["kubernetes"])):
            check(False, problem)
    tf = shutil.which("terraform")
    if tf is None:
        print("terraform is not on PATH: skipping terraform fmt -check and the escape cross-check")
        return
    for problem in terraform_problems(tf):
        check(False, problem)
    plugin_dir = os.environ.get("APONO_TEST_TF_PLUGIN_DIR")
    if plugin_dir:
        problems, done = validate_problems(tf, plugin_dir)
        for problem in problems:
            check(False, problem)
        print(f"terraform with the providers in {plugin_dir}: {', '.join(done) or 'none held there'}")


if __name__ == "__main__":
    failures = []

    def _check(cond, what):
        if not cond:
            failures.append(what)
            print(f"FAIL {what}")

    run(_check)
    print(f"terraform checks: {len(failures)} failures")
    raise SystemExit(1 if failures else 0)

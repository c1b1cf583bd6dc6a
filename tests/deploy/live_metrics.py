"""The metric names a running daemon serves on /metrics, for the dashboard and alert checks.

Starts, on free loopback ports, the Rancher simulator (`apono-connector sim rancher`, its API key
expiring in a few days), a standalone `apono-connector run` with the simulator as an integration,
and a remote-mode `run` whose control plane is not there; then drives what makes each metric family
show: a validate job (the key's expiry), an access granted, its binding deleted behind the
connector's back (the reconcile repairs it), a grant refused by Rancher (a wrong key), the access
revoked, a short access revoked at its expiry (the revoke lag). Last, the daemon is started again on
a copy of its state taken before a grant it then made: the reconcile finds that grant's binding
claimed by no access and sweeps it (the swept-bindings counter). Every process is stopped by its
own PID.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

DEADLINE_S = 60


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, token=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read().decode()


def wait_for(what, probe):
    """Polls `probe` until it returns something truthy; fails after DEADLINE_S with `what`."""
    end = time.monotonic() + DEADLINE_S
    last = None
    while time.monotonic() < end:
        try:
            got = probe()
            if got:
                return got
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not seen within {DEADLINE_S} s ({last})")


def sample_names(text):
    """Names a Prometheus query can use: every sample line's metric name, plus the suffixes each
    `# TYPE` family has in the text format (counters `_total`, histograms `_bucket`/`_sum`/`_count`)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            names |= {"counter": {family + "_total"}, "histogram": {family + s for s in ("_bucket", "_sum", "_count")}}.get(
                kind, {family})
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


class Processes:
    def __init__(self, log_dir):
        self.procs = []
        self.log_dir = log_dir

    def start(self, name, args, env):
        log = open(os.path.join(self.log_dir, name + ".log"), "w")
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self):
        for proc in self.procs:
            proc.kill()
            proc.wait()

    def end(self, proc):
        """SIGTERM, then wait: the daemon releases its data dir's lock on the way out."""
        proc.terminate()
        try:
            proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post(url, token, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read().decode() or "null")


def collect(binary):
    """{metric name seen on /metrics of the standalone and the remote-mode daemon}."""
    work = tempfile.mkdtemp(prefix="apono-metrics-")
    procs = Processes(work)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("APONO_", "HASHICORP_", "ALLOWED_SECRETS"))}
    try:
        sim_port = free_port()
        procs.start("sim", [binary, "sim", "rancher", "--listen", f"127.0.0.1:{sim_port}", "--key-expires-in-days", "5"],
                    base_env)
        sim_log = os.path.join(work, "sim.log")
        key = wait_for("the simulator's API key", lambda: re.search(r"API key (\S+?);", open(sim_log).read()))
        access_key, secret_key = key.group(1).split(":", 1)
        sim = f"http://127.0.0.1:{sim_port}"
        cluster = json.loads(get(f"{sim}/v3/clusters", key.group(1)))["data"][0]["id"]

        api_port, health_port = free_port(), free_port()
        data_dir = os.path.join(work, "data")
        config = os.path.join(work, "connector.toml")
        with open(config, "w") as f:
            f.write(f"""[standalone]
sweep_interval_seconds = 1

[[integrations]]
type = "rancher"
name = "sim"
config = {{ host = "{sim}" }}
secret_store = {{ type = "APONO", credentials = {{ access_key = "{access_key}", secret_key = "{secret_key}" }} }}

[[integrations]]
type = "rancher"
name = "wrong-key"
config = {{ host = "{sim}" }}
secret_store = {{ type = "APONO", credentials = {{ access_key = "{access_key}", secret_key = "not-the-key" }} }}
""")
        env = dict(base_env, APONO_DATA_DIR=data_dir, APONO_LISTEN_ADDR=f"127.0.0.1:{api_port}",
                   APONO_HEALTH_ADDR=f"127.0.0.1:{health_port}", APONO_LOG_FORMAT="text")
        metrics = f"http://127.0.0.1:{health_port}/metrics"
        operator = f"http://127.0.0.1:{api_port}/operator/v1"

        def start_daemon(name):
            proc = procs.start(name, [binary, "run", "--config", config], env)
            wait_for(f"{name}: the standalone daemon's /readyz", lambda: get(f"http://127.0.0.1:{health_port}/readyz"))
            return proc

        # The state as it is before any grant (its install id, hence its owner, already made).
        procs.end(start_daemon("run-first"))
        before_grants = os.path.join(work, "data-before-grants")
        shutil.copytree(data_dir, before_grants)

        daemon = start_daemon("run")
        operator_token = open(os.path.join(data_dir, "operator.token")).read().strip()

        def cli(*args):
            return subprocess.run([binary, "access", *args, "--control-plane", f"http://127.0.0.1:{api_port}"],
                                  env=env, capture_output=True, text=True, timeout=30)

        def request(user, ttl, integration="sim", role="cluster-member"):
            done = cli("request", "--integration", integration, "--user", user, "--create-user",
                       "--role", role, "--resource", cluster, "--ttl", ttl)
            if done.returncode != 0 and integration == "sim":
                raise RuntimeError(f"access request failed: {done.stderr}")
            return done

        # The key's expiry is read by a validate job.
        post(f"{operator}/jobs", operator_token, {"kind": "validate", "integration": "sim"})
        wait_for("the key's expiry", lambda: "apono_connector_api_key_expires_in_days{" in get(metrics))

        request("metrics-check", "1h")
        request("metrics-check", "1h", integration="wrong-key")
        wait_for("a grant", lambda: 'kind="grant",outcome="succeeded"' in get(metrics))

        # A person deletes the connector's binding: the reconcile repairs the access.
        bindings = json.loads(get(f"{sim}/v3/clusterroletemplatebindings", key.group(1)))["data"]
        ours = [b for b in bindings if b.get("labels", {}) and any("apono" in k for k in b["labels"])]
        for b in ours:
            urllib.request.urlopen(urllib.request.Request(
                f"{sim}/v3/clusterroletemplatebindings/{b['id']}", method="DELETE",
                headers={"Authorization": f"Bearer {key.group(1)}"}), timeout=5).read()
        wait_for("a repair", lambda: "apono_connector_access_repairs_total{" in get(metrics))
        listed = json.loads(cli("list", "--json").stdout or "[]")
        for access in listed if isinstance(listed, list) else listed.get("accesses", []):
            cli("revoke", access["id"])
        wait_for("a revoke", lambda: 'kind="revoke"' in get(metrics))

        # An access revoked at its expiry: the revoke lag.
        request("metrics-short", "2s")
        wait_for("a revoke after expiry", lambda: re.search(
            r"^apono_connector_revoke_lag_seconds_count [1-9]", get(metrics), re.M))
        # An access left in place: the copy of the state taken before it knows nothing of it.
        request("metrics-unclaimed", "1h", role="cluster-owner")  # returns once granted
        # The gauges count what the state holds: this one access, nothing overdue or queued.
        wait_for("the access gauges", lambda: all(re.search(line, get(metrics), re.M) for line in (
            r'^apono_connector_accesses\{state="active"\} 1$', r'^apono_connector_accesses\{state="revoking"\} 0$',
            r"^apono_connector_accesses_overdue 0$", r'^apono_connector_jobs_queued\{kind="grant"\} 0$')))
        names = sample_names(get(metrics))
        procs.end(daemon)

        # The same owner on the older state: the binding of that access is claimed by none, and
        # the reconcile at start sweeps it.
        shutil.rmtree(data_dir)
        shutil.copytree(before_grants, data_dir)
        # No grace for a binding no access claims (by default one is left alone for a while).
        with open(config) as f:
            text = f.read()
        with open(config, "w") as f:
            f.write(text.replace(f'host = "{sim}" }}', f'host = "{sim}", unclaimed_grace_seconds = 0 }}', 1))
        start_daemon("run-restored")
        wait_for("a swept binding", lambda: "apono_connector_swept_bindings_total{" in get(metrics))
        names |= sample_names(get(metrics))

        # Remote mode, its control plane not there: the control-plane error counter.
        remote_health = free_port()
        remote_env = dict(base_env, APONO_URL=f"http://127.0.0.1:{free_port()}", APONO_TOKEN="metrics-check",
                          APONO_CONNECTOR_ID="metrics-check", APONO_HEALTH_ADDR=f"127.0.0.1:{remote_health}")
        procs.start("remote", [binary, "run"], remote_env)
        remote = wait_for("the remote daemon's control-plane errors", lambda: (
            lambda text: text if "apono_connector_control_plane_errors_total{" in text else None)(
                get(f"http://127.0.0.1:{remote_health}/metrics")))
        return names | sample_names(remote)
    except Exception:
        # What the processes said is what explains a drive that did not happen.
        for name in sorted(os.listdir(work)):
            if name.endswith(".log"):
                print(f"--- {name} (last lines) ---\n" + "".join(open(os.path.join(work, name)).readlines()[-25:]))
        raise
    finally:
        procs.stop()
        shutil.rmtree(work, ignore_errors=True)

{{/* Names and labels (the usual `helm create` helpers, so nameOverride/fullnameOverride work). */}}
{{- define "apono-connector.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "apono-connector.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Names of the control plane's objects: a DNS label, so at most 63 characters. */}}
{{- define "apono-connector.controlPlaneName" -}}
{{- printf "%s-control-plane" (include "apono-connector.fullname" . | trunc 49 | trimSuffix "-") -}}
{{- end -}}

{{/*
Name of the Secret-reading Role, RoleBinding, ClusterRole and ClusterRoleBinding. It carries the
release namespace: Roles land in other namespaces and ClusterRoles are cluster-wide, so two
releases of the same name in two namespaces must not claim the same object.
*/}}
{{- define "apono-connector.secretReaderName" -}}
{{- printf "%s-%s-secret-reader" .Release.Namespace (include "apono-connector.fullname" .) -}}
{{- end -}}

{{- define "apono-connector.selectorLabels" -}}
app.kubernetes.io/name: {{ include "apono-connector.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
The control plane's pods get their own `name` label: the agent Deployment's selector (name +
instance, immutable since chart 0.1.0) must not match them.
*/}}
{{- define "apono-connector.controlPlaneSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-control-plane" (include "apono-connector.name" . | trunc 49 | trimSuffix "-") }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "apono-connector.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ include "apono-connector.versionLabel" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: apono-connector
{{- end -}}

{{- define "apono-connector.labels" -}}
{{ include "apono-connector.commonLabels" . }}
{{ include "apono-connector.selectorLabels" . }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "apono-connector.controlPlaneLabels" -}}
{{ include "apono-connector.commonLabels" . }}
{{ include "apono-connector.controlPlaneSelectorLabels" . }}
app.kubernetes.io/component: control-plane
{{- end -}}

{{/*
A value from --set or a values file as text. Values files reach templates as JSON numbers
(float64), so a numeric token or account id would print as 1.23456789012e+11: whole numbers
are printed as integers.
*/}}
{{- define "apono-connector.scalar" -}}
{{- if and (kindIs "float64" .) (eq (. | int64 | float64) .) -}}
{{- . | int64 -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/*
The ServiceAccount's name. Created: `serviceAccount.name`, else Apono's own name
`apono-connector-service-account`, which existing GKE Workload Identity and IRSA trust bindings
name. Not created: the name must be given; the namespace's `default` account is never used
silently (it would receive the Secret-reading RBAC).
*/}}
{{- define "apono-connector.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default "apono-connector-service-account" .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create=false: name the existing ServiceAccount the agent runs as (the chart never falls back to the namespace's `default` account)" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The ServiceAccount's annotations: yours, plus those Apono's value names stand for. */}}
{{- define "apono-connector.serviceAccountAnnotations" -}}
{{- $sa := .Values.serviceAccount -}}
{{- $out := dict -}}
{{- with $sa.gcpServiceAccountEmail -}}
{{- $_ := set $out "iam.gke.io/gcp-service-account" . -}}
{{- end -}}
{{- if or $sa.awsRoleName $sa.awsRoleAccountId -}}
{{- if not (and $sa.awsRoleName $sa.awsRoleAccountId) -}}
{{- fail "serviceAccount.awsRoleName and serviceAccount.awsRoleAccountId go together (they make the IRSA annotation eks.amazonaws.com/role-arn: arn:aws:iam::<awsRoleAccountId>:role/<awsRoleName>): set both, or neither" -}}
{{- end -}}
{{- $_ := set $out "eks.amazonaws.com/role-arn" (printf "arn:aws:iam::%s:role/%s" (include "apono-connector.scalar" $sa.awsRoleAccountId) $sa.awsRoleName) -}}
{{- end -}}
{{- /* Annotations written out win over the ones derived above. */ -}}
{{- $out = merge (deepCopy (default dict $sa.annotations)) $out -}}
{{- if $out -}}{{- toYaml $out -}}{{- end -}}
{{- end -}}

{{/*
The version the pods run, as a label value: image.tag when set (the chart's appVersion is then
not what runs), else the digest's first 12 hex digits when only a digest is given, else appVersion.
Characters a label value cannot hold become "_".
*/}}
{{- define "apono-connector.versionLabel" -}}
{{- $image := .Values.image -}}
{{- $version := .Chart.AppVersion -}}
{{- if not (kindIs "invalid" $image.tag) -}}{{- with include "apono-connector.scalar" $image.tag -}}{{- $version = . -}}{{- end -}}{{- end -}}
{{- if and $image.digest (or (kindIs "invalid" $image.tag) (not (include "apono-connector.scalar" $image.tag))) -}}
{{- $version = printf "sha256-%s" (trimPrefix "sha256:" $image.digest | trunc 12) -}}
{{- end -}}
{{- regexReplaceAll "[^A-Za-z0-9._-]" (toString $version) "_" | trunc 63 | trimAll "._-" -}}
{{- end -}}

{{/* The registry: global.imageRegistry (an umbrella chart's, as Bitnami charts read it) wins over image.registry. */}}
{{- define "apono-connector.imageRegistry" -}}
{{- (.Values.global | default dict).imageRegistry | default .Values.image.registry -}}
{{- end -}}

{{- define "apono-connector.image" -}}
{{- $image := .Values.image -}}
{{- $repository := $image.repository -}}
{{- $registry := include "apono-connector.imageRegistry" . -}}
{{- if not $repository -}}
{{- if $registry -}}
{{- $repository = printf "%s/%s" (trimSuffix "/" $registry) $image.name -}}
{{- else -}}
{{- $repository = $image.name -}}
{{- end -}}
{{- end -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (include "apono-connector.scalar" (default .Chart.AppVersion $image.tag)) -}}
{{- end -}}
{{- end -}}

{{/* Secret holding the control-plane token, its key, and where it is mounted. */}}
{{- define "apono-connector.tokenSecretName" -}}
{{- default (include "apono-connector.fullname" .) .Values.apono.existingSecret -}}
{{- end -}}
{{- define "apono-connector.tokenSecretKey" -}}
{{- if .Values.apono.existingSecret -}}{{ .Values.apono.existingSecretKey }}{{- else -}}APONO_TOKEN{{- end -}}
{{- end -}}
{{- define "apono-connector.tokenDir" -}}/var/run/secrets/apono{{- end -}}

{{/*
The token as a volume: a whole-Secret mount (no subPath), so the kubelet updates the file when
the Secret is rotated and the agent, which re-reads APONO_TOKEN_FILE when refused, follows.
*/}}
{{- define "apono-connector.tokenVolume" -}}
- name: apono-token
  secret:
    secretName: {{ include "apono-connector.tokenSecretName" . }}
    items:
      - key: {{ include "apono-connector.tokenSecretKey" . }}
        path: token
{{- end -}}

{{/* Vault definitions: a Secret of ours, or the user's. */}}
{{- define "apono-connector.vaultEnabled" -}}
{{- if or .Values.hashicorpVault.config .Values.hashicorpVault.existingSecret -}}true{{- end -}}
{{- end -}}
{{- define "apono-connector.vaultSecretName" -}}
{{- default (printf "%s-vault" (include "apono-connector.fullname" .)) .Values.hashicorpVault.existingSecret -}}
{{- end -}}
{{- define "apono-connector.vaultSecretKey" -}}
{{- if .Values.hashicorpVault.existingSecret -}}{{ .Values.hashicorpVault.existingSecretKey }}{{- else -}}config.json{{- end -}}
{{- end -}}

{{/* Whether a Vault definition in the values logs in with Vault's Kubernetes auth. */}}
{{- define "apono-connector.vaultKubernetesAuth" -}}
{{- $config := .Values.hashicorpVault.config -}}
{{- if $config -}}
{{- $text := kindIs "string" $config | ternary $config (toJson $config) -}}
{{- if regexMatch "\"auth\"\\s*:\\s*\"kubernetes\"" $text -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/*
allowedSecretsToRead as a JSON list of entries, as written (`name` or `namespace/name`). Accepts
a list (--set allowedSecretsToRead={a,b}), a string ("a,b"), or list items holding commas (what
`{a\,b}` gives, as in Apono's Terraform example), so every documented way of setting it yields
the same entries.
*/}}
{{- define "apono-connector.allowedSecrets" -}}
{{- $raw := .Values.allowedSecretsToRead -}}
{{- if kindIs "string" $raw -}}{{- $raw = list $raw -}}{{- end -}}
{{- $entries := list -}}
{{- range $raw -}}
{{- range splitList "," (toString .) -}}
{{- $entry := trim . | trimPrefix "{" | trimSuffix "}" | trim -}}
{{- if $entry -}}{{- $entries = append $entries $entry -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson (uniq $entries) -}}
{{- end -}}

{{/*
The allow-list grouped by namespace, as JSON {namespace: [names]}: one Role per namespace. A
bare name means the release namespace.
*/}}
{{- define "apono-connector.allowedSecretsByNamespace" -}}
{{- $byNamespace := dict -}}
{{- range (include "apono-connector.allowedSecrets" . | fromJsonArray) -}}
{{- $parts := splitList "/" . -}}
{{- $namespace := $.Release.Namespace -}}
{{- $name := . -}}
{{- if eq (len $parts) 2 -}}
{{- $namespace = index $parts 0 -}}
{{- $name = index $parts 1 -}}
{{- end -}}
{{- if or (gt (len $parts) 2) (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $namespace)) (not (regexMatch "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$" $name)) -}}
{{- fail (printf "allowedSecretsToRead: %q is not a Secret name or namespace/name (lowercase letters, digits, '-' and '.'; one '/' at most)" .) -}}
{{- end -}}
{{- $names := get $byNamespace $namespace | default list -}}
{{- $_ := set $byNamespace $namespace (append $names $name | uniq) -}}
{{- end -}}
{{- toJson $byNamespace -}}
{{- end -}}

{{/*
The allow-list as the agent gets it (ALLOWED_SECRETS_TO_READ): every entry `namespace/name`, a bare
name qualified with the release namespace, as the RBAC reads it. The agent reads a bare name as
"in any namespace", which would make its own gate wider than the chart documents.
*/}}
{{- define "apono-connector.allowedSecretsQualified" -}}
{{- $out := list -}}
{{- range (include "apono-connector.allowedSecrets" . | fromJsonArray) -}}
{{- $out = append $out (ternary . (printf "%s/%s" $.Release.Namespace .) (contains "/" .)) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/*
allowedRancherHosts as a JSON list of `host[:port]` (lower case): a list, a comma-separated string,
or list items holding commas, as allowedSecretsToRead accepts. A URL or a path fails the install.
*/}}
{{- define "apono-connector.allowedRancherHosts" -}}
{{- $raw := .Values.allowedRancherHosts -}}
{{- if kindIs "string" $raw -}}{{- $raw = list $raw -}}{{- end -}}
{{- $hosts := list -}}
{{- range $raw -}}
{{- range splitList "," (toString .) -}}
{{- $host := trim . | trimPrefix "{" | trimSuffix "}" | trim | lower -}}
{{- if $host -}}
{{- if not (regexMatch "^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\\.?|\\[[0-9a-f:.]+\\])(:[0-9]{1,5})?$" $host) -}}
{{- fail (printf "allowedRancherHosts: %q is not host or host:port (no scheme, no path: e.g. rancher.example.com or rancher.example.com:8443)" $host) -}}
{{- end -}}
{{- $hosts = append $hosts $host -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson (uniq $hosts) -}}
{{- end -}}

{{/*
The agent's config file (config, or existingConfigMap): "true" when there is one. Fails when
terminationGracePeriodSeconds is not above the file's agent.shutdown_grace_seconds + 10: the
kubelet would kill the agent before its in-flight jobs had their grace.
*/}}
{{- define "apono-connector.agentConfig" -}}
{{- $grace := 30 -}}
{{- with .Values.config -}}
{{- $line := regexFind "(?m)^[ \\t]*shutdown_grace_seconds[ \\t]*=[ \\t]*[0-9]+" . -}}
{{- if $line -}}{{- $grace = regexFind "[0-9]+$" $line | int -}}{{- end -}}
{{- end -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (add $grace 10) -}}
{{- fail (printf "terminationGracePeriodSeconds=%v must be above the agent's shutdown_grace_seconds (%d%s) + 10: the kubelet would kill the agent while its in-flight jobs still have their grace" .Values.terminationGracePeriodSeconds $grace (ternary ", from config" ", the default" (ne $grace 30))) -}}
{{- end -}}
{{- if or .Values.config .Values.existingConfigMap -}}true{{- end -}}
{{- end -}}

{{/* The key of the agent's config file: connector.toml in the chart's Secret, existingConfigMapKey in yours. */}}
{{- define "apono-connector.agentConfigKey" -}}
{{- if .Values.existingConfigMap -}}{{ .Values.existingConfigMapKey }}{{- else -}}connector.toml{{- end -}}
{{- end -}}

{{/*
Replicas of the in-cluster control plane: controlPlane.replicas, else 2 with a database and 1
without. More than one without a database fails: SQLite on one volume serves one process.
*/}}
{{- define "apono-connector.controlPlaneReplicas" -}}
{{- $cp := .Values.controlPlane -}}
{{- $replicas := ternary 2 1 (not (empty $cp.database.existingSecret)) -}}
{{- if not (kindIs "invalid" $cp.replicas) -}}{{- $replicas = int $cp.replicas -}}{{- end -}}
{{- if and (gt $replicas 1) (not $cp.database.existingSecret) -}}
{{- fail (printf "controlPlane.replicas=%d needs controlPlane.database.existingSecret: without a database the state is one SQLite file that one process holds. Set a PostgreSQL URL Secret (README: \"High availability\"), or leave controlPlane.replicas unset" $replicas) -}}
{{- end -}}
{{- $replicas -}}
{{- end -}}

{{/* Spread of the control plane's replicas: controlPlane.topologySpreadConstraints, or by default
across zones and then nodes (ScheduleAnyway: a one-zone cluster still schedules). */}}
{{- define "apono-connector.controlPlaneSpread" -}}
{{- $spread := .Values.controlPlane.topologySpreadConstraints -}}
{{- if kindIs "invalid" $spread -}}
{{- $selector := include "apono-connector.controlPlaneSelectorLabels" . | fromYaml -}}
{{- $spread = list -}}
{{- range list "topology.kubernetes.io/zone" "kubernetes.io/hostname" -}}
{{- $spread = append $spread (dict "maxSkew" 1 "topologyKey" . "whenUnsatisfiable" "ScheduleAnyway" "labelSelector" (dict "matchLabels" $selector)) -}}
{{- end -}}
{{- end -}}
{{- with $spread -}}{{- toYaml . -}}{{- end -}}
{{- end -}}

{{/* host:port the pods listen on: listenHost ("0.0.0.0", or "[::]" on IPv6 and dual-stack clusters). */}}
{{- define "apono-connector.listenAddr" -}}
{{- $host := .root.Values.listenHost -}}
{{- if and (contains ":" $host) (not (hasPrefix "[" $host)) -}}{{- $host = printf "[%s]" $host -}}{{- end -}}
{{- printf "%s:%v" $host .port -}}
{{- end -}}

{{/* Whether the agent may read Kubernetes Secrets at all (a non-empty allow-list, or all). */}}
{{- define "apono-connector.readsKubernetesSecrets" -}}
{{- if or .Values.allowAllSecrets (include "apono-connector.allowedSecrets" . | fromJsonArray) -}}true{{- end -}}
{{- end -}}

{{/*
The pod's ServiceAccount token mount: `serviceAccount.automount` when set; otherwise on only when
the agent calls the Kubernetes API (it reads Kubernetes Secrets) or logs in to Vault with the
token (a definition with "auth": "kubernetes").
*/}}
{{- define "apono-connector.automount" -}}
{{- if kindIs "bool" .Values.serviceAccount.automount -}}
{{- .Values.serviceAccount.automount -}}
{{- else if or (include "apono-connector.readsKubernetesSecrets" .) (include "apono-connector.vaultKubernetesAuth" .) -}}
true
{{- else -}}
false
{{- end -}}
{{- end -}}

{{/* The control plane the agent connects to. */}}
{{- define "apono-connector.controlPlaneUrl" -}}
{{- if .Values.controlPlane.enabled -}}
{{- if .Values.apono.url -}}
{{- fail "apono.url and controlPlane.enabled=true both name a control plane: leave apono.url empty (the agent then connects to the one this chart runs) or set controlPlane.enabled=false" -}}
{{- end -}}
{{- printf "http://%s.%s.svc:%v" (include "apono-connector.controlPlaneName" .) .Release.Namespace .Values.controlPlane.service.port -}}
{{- else -}}
{{- $url := required "apono.url is required: the address of the control plane this agent connects to (APONO_URL; a bare host means https). The chart has no default, so the token goes nowhere you did not name. Or set controlPlane.enabled=true to run a control plane in this cluster" .Values.apono.url -}}
{{- if and (include "apono-connector.isAponoHost" $url) (not .Values.apono.allowAponoHost) -}}
{{- fail (printf "apono.url %s is Apono's service (carried over from a values file or Terraform module written for Apono's connector): this agent speaks its own protocol, would never become ready there, and would send the token to Apono on every retry. Point apono.url at the control plane you run, or set controlPlane.enabled=true; set apono.allowAponoHost=true only if that host really runs this project's control plane" $url) -}}
{{- end -}}
{{- $url -}}
{{- end -}}
{{- end -}}

{{/*
"true" when a URL (or bare host) names a host in Apono's own domain: the host is the domain or
ends in "." and the domain (a suffix match, as deploy review N1 asks, so a look-alike such as
notapono.io is not caught).
*/}}
{{- define "apono-connector.isAponoHost" -}}
{{- $url := toString . | trim | lower -}}
{{- if not (contains "://" $url) -}}{{- $url = printf "https://%s" $url -}}{{- end -}}
{{- $host := regexReplaceAll ":[0-9]*$" (urlParse $url).host "" | trimSuffix "." -}}
{{- $domain := "apono.io" -}}
{{- if or (eq $host $domain) (hasSuffix (printf ".%s" $domain) $host) -}}true{{- end -}}
{{- end -}}

{{/* Settings that contradict each other fail the install with what to change. */}}
{{- define "apono-connector.validate" -}}
{{- /* Checks every allow-list entry, whether or not the chart makes RBAC. */ -}}
{{- $_ := include "apono-connector.allowedSecretsByNamespace" . -}}
{{- if and .Values.allowAllSecrets (include "apono-connector.allowedSecrets" . | fromJsonArray) -}}
{{- fail "allowAllSecrets=true and allowedSecretsToRead both set: list the Secrets the agent may read, or allow all of them, not both" -}}
{{- end -}}
{{- end -}}

{{/*
Whether to render the ServiceMonitor: serviceMonitor.renderMode decides what happens when Helm does
not report the CRD (`helm template` without --api-versions, GitOps pre-renders, a cluster without
the Prometheus Operator). alwaysRender: an explicit request is never dropped in silence (the apply
fails with "no matches for kind ServiceMonitor" where the CRD is missing); skipIfMissing: left out
(for bootstrapping before the CRDs); failIfMissing: the install fails with the reason.
*/}}
{{- define "apono-connector.renderServiceMonitor" -}}
{{- $sm := .Values.serviceMonitor -}}
{{- $served := .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor" -}}
{{- if not $sm.enabled -}}
false
{{- else if or $served (eq $sm.renderMode "alwaysRender") -}}
true
{{- else if eq $sm.renderMode "failIfMissing" -}}
{{- fail "serviceMonitor.enabled=true with renderMode=failIfMissing, but the cluster serves no monitoring.coreos.com/v1 ServiceMonitor: install the Prometheus Operator's CRDs first, pass --api-versions monitoring.coreos.com/v1/ServiceMonitor to helm template, or set serviceMonitor.renderMode=skipIfMissing" -}}
{{- else -}}
false
{{- end -}}
{{- end -}}

{{/* Where the pods may run: the agents' and the `helm test` pod's (on tainted or dedicated nodes
the test pod must go where the agents go, or it stays Pending). */}}
{{- define "apono-connector.placement" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

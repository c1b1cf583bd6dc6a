{{/* Names and labels. */}}
{{- define "apono-connector.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "apono-connector.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "apono-connector.selectorLabels" -}}
app.kubernetes.io/name: {{ include "apono-connector.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "apono-connector.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "apono-connector.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "apono-connector.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "apono-connector.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "apono-connector.image" -}}
{{- $tag := default .Chart.AppVersion (toString .Values.image.tag) -}}
{{- if .Values.image.registry -}}
{{- printf "%s/%s:%s" .Values.image.registry .Values.image.name $tag -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.name $tag -}}
{{- end -}}
{{- end -}}

{{/* Secret holding the control-plane token, and its key. */}}
{{- define "apono-connector.tokenSecretName" -}}
{{- default (include "apono-connector.fullname" .) .Values.apono.existingSecret -}}
{{- end -}}
{{- define "apono-connector.tokenSecretKey" -}}
{{- if .Values.apono.existingSecret -}}{{ .Values.apono.existingSecretKey }}{{- else -}}APONO_TOKEN{{- end -}}
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

{{/*
allowedSecretsToRead as a JSON list of names. Accepts a list (--set allowedSecretsToRead={a,b}),
a string ("a,b"), or list items holding commas (what `{a\,b}` gives, as in Apono's Terraform
example), so every documented way of setting it yields the same names.
*/}}
{{- define "apono-connector.allowedSecrets" -}}
{{- $raw := .Values.allowedSecretsToRead -}}
{{- if kindIs "string" $raw -}}{{- $raw = list $raw -}}{{- end -}}
{{- $names := list -}}
{{- range $raw -}}
{{- range splitList "," (toString .) -}}
{{- $name := trim . | trimPrefix "{" | trimSuffix "}" | trim -}}
{{- if $name -}}{{- $names = append $names $name -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson (uniq $names) -}}
{{- end -}}

{{/* Chart name. */}}
{{- define "pullproxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's resources. */}}
{{- define "pullproxy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels on every resource of the release. */}}
{{- define "pullproxy.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "pullproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels of the daemon's resources. */}}
{{- define "pullproxy.labels" -}}
{{ include "pullproxy.commonLabels" . }}
app.kubernetes.io/component: node-proxy
{{- end }}

{{/* Labels that select the daemon's pods. */}}
{{- define "pullproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pullproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-proxy
{{- end }}

{{/* The pullproxy image. */}}
{{- define "pullproxy.image" -}}
{{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Name of the Secret holding the hub credentials, or "" when there are none. */}}
{{- define "pullproxy.hubSecret" -}}
{{- $c := .Values.hubCredentials }}
{{- if $c.existingSecret }}{{ $c.existingSecret }}
{{- else if or $c.password $c.dockerconfigjson }}{{ include "pullproxy.fullname" . }}-hub
{{- end }}
{{- end }}

{{/* Name of the Secret holding the operator's node CA, or "" when pullproxy generates it. */}}
{{- define "pullproxy.nodeCASecret" -}}
{{- if .Values.nodeCA.existingSecret }}{{ .Values.nodeCA.existingSecret }}
{{- else if .Values.nodeCA.cert }}{{ include "pullproxy.fullname" . }}-node-ca
{{- end }}
{{- end }}

{{/* Where the Secrets and the configuration are mounted in the containers. */}}
{{- define "pullproxy.configDir" -}}/etc/pullproxy/config{{- end }}
{{- define "pullproxy.hubDir" -}}/etc/pullproxy/hub{{- end }}
{{- define "pullproxy.nodeCADir" -}}/etc/pullproxy/node-ca{{- end }}

{{/* pullproxy.yaml: .Values.config with the keys the chart owns filled in. */}}
{{- define "pullproxy.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $hub := $cfg.hub }}
{{- if include "pullproxy.hubSecret" . }}
{{- $_ := set $hub "password" nil }}
{{- if eq .Values.hubCredentials.type "dockerconfigjson" }}
{{- $_ := set $hub "password_file" nil }}
{{- $_ := set $hub "dockerconfigjson" (printf "%s/.dockerconfigjson" (include "pullproxy.hubDir" .)) }}
{{- else if eq .Values.hubCredentials.type "password" }}
{{- $_ := set $hub "dockerconfigjson" nil }}
{{- $_ := set $hub "password_file" (printf "%s/password" (include "pullproxy.hubDir" .)) }}
{{- else }}
{{- fail (printf "hubCredentials.type must be password or dockerconfigjson, not %q" .Values.hubCredentials.type) }}
{{- end }}
{{- end }}
{{- if include "pullproxy.nodeCASecret" . }}
{{- $_ := set $cfg.tls "ca_cert" (printf "%s/tls.crt" (include "pullproxy.nodeCADir" .)) }}
{{- $_ := set $cfg.tls "ca_key" (printf "%s/tls.key" (include "pullproxy.nodeCADir" .)) }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* The admin port, from config.admin.listen (host:port or [v6]:port). */}}
{{- define "pullproxy.adminPort" -}}
{{- splitList ":" .Values.config.admin.listen | last | atoi }}
{{- end }}

{{/* Security context of containers that touch the pins: uid 0, never privileged. */}}
{{- define "pullproxy.securityContext" -}}
runAsUser: 0
runAsGroup: 0
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
{{- with .Values.appArmorProfile }}
appArmorProfile:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.seccompProfile }}
seccompProfile:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

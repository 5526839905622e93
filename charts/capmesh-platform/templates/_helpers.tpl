{{- define "capmesh-platform.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "capmesh-platform.labels" -}}
helm.sh/chart: {{ include "capmesh-platform.chart" . }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: capmesh
{{- end }}

{{/* A name for the platform's own objects: <release>-<suffix>, a DNS label. */}}
{{- define "capmesh-platform.name" -}}
{{- printf "%s-%s" (.root.Release.Name | trunc 40 | trimSuffix "-") .suffix | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The agent aliases declared in Chart.yaml: every dependency on the capmesh-agent chart. (Helm
replaces a dependency's name by its alias once loaded, so the repository tells them apart.)
*/}}
{{- define "capmesh-platform.agentAliases" -}}
{{- $aliases := list }}
{{- range .Chart.Dependencies }}
{{- if hasSuffix "/capmesh-agent" .Repository }}
{{- $aliases = append $aliases (.Alias | default .Name) }}
{{- end }}
{{- end }}
{{- $aliases | toJson }}
{{- end }}

{{/* The control plane's Service name, as the control-plane subchart computes it. */}}
{{- define "capmesh-platform.controlPlaneName" -}}
{{- $cp := index .Values "control-plane" }}
{{- if $cp.fullnameOverride }}
{{- $cp.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains "control-plane" .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-control-plane" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "capmesh-platform.adminTokenSecret" -}}
{{- $cp := index .Values "control-plane" }}
{{- dig "adminToken" "existingSecret" "" $cp | default (printf "%s-admin-token" (include "capmesh-platform.controlPlaneName" .)) }}
{{- end }}

{{- define "capmesh-platform.adminTokenKey" -}}
{{- $cp := index .Values "control-plane" }}
{{- if dig "adminToken" "existingSecret" "" $cp }}{{ dig "adminToken" "existingSecretKey" "admin-token" $cp }}{{ else }}admin-token{{ end }}
{{- end }}

{{- define "capmesh-platform.apiPort" -}}
{{- dig "service" "apiPort" 8000 (index .Values "control-plane") }}
{{- end }}

{{- define "capmesh-platform.adminPort" -}}
{{- dig "service" "adminPort" 9090 (index .Values "control-plane") }}
{{- end }}

{{/* Fails the render when the platform's parts do not fit together. */}}
{{- define "capmesh-platform.validate" -}}
{{- $cp := index .Values "control-plane" }}
{{- if and .Values.postgresql.enabled $cp.enabled }}
{{- if not (or (dig "store" "postgres" "host" "" $cp) (dig "store" "postgres" "existingSecret" "" $cp)) }}
{{- fail "postgresql.enabled deploys a database, but control-plane.store.postgres.host is empty: set it to the database Service (postgresql.fullnameOverride, \"capmesh-postgresql\" by default) and control-plane.store.postgres.passwordSecret to the same name, as in values-production.yaml" }}
{{- end }}
{{- end }}
{{- end }}

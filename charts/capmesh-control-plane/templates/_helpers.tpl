{{/* Chart name (the alias when used as a dependency). */}}
{{- define "capmesh-control-plane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: fullnameOverride, the release name when it already contains the chart
name, else <release>-<name>. Truncated to a DNS label.
*/}}
{{- define "capmesh-control-plane.fullname" -}}
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

{{- define "capmesh-control-plane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "capmesh-control-plane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "capmesh-control-plane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end }}

{{- define "capmesh-control-plane.labels" -}}
helm.sh/chart: {{ include "capmesh-control-plane.chart" . }}
{{ include "capmesh-control-plane.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: capmesh
{{- end }}

{{- define "capmesh-control-plane.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "capmesh-control-plane.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* registry/repository:tag, with global.imageRegistry and global.imageTag as fallbacks. */}}
{{- define "capmesh-control-plane.image" -}}
{{- $g := .Values.global | default dict }}
{{- $registry := .Values.image.registry | default "" }}
{{- if $g.imageRegistry }}{{ $registry = $g.imageRegistry }}{{ end }}
{{- $tag := .Values.image.tag | default $g.imageTag | default .Chart.AppVersion }}
{{- if $registry }}
{{- printf "%s/%s:%s" $registry .Values.image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The capmesh-proxy image the admission webhook injects (same fallbacks). */}}
{{- define "capmesh-control-plane.proxyImage" -}}
{{- $g := .Values.global | default dict }}
{{- $i := .Values.webhook.proxyImage }}
{{- $registry := $i.registry | default "" }}
{{- if $g.imageRegistry }}{{ $registry = $g.imageRegistry }}{{ end }}
{{- $tag := $i.tag | default $g.imageTag | default .Chart.AppVersion }}
{{- if $registry }}
{{- printf "%s/%s:%s" $registry $i.repository $tag }}
{{- else }}
{{- printf "%s:%s" $i.repository $tag }}
{{- end }}
{{- end }}

{{/*
The admission webhook's certificate as base64 PEM (ca.crt, tls.crt, tls.key): the Secret's on
upgrades (lookup), so the caBundle keeps matching; else a new CA (genCA) and a serving
certificate for the Service's DNS names signed by it (genSignedCert). One call per render:
the Secret and the caBundle come from the same template.
*/}}
{{- define "capmesh-control-plane.webhookCerts" -}}
{{- $fullname := include "capmesh-control-plane.fullname" . }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (printf "%s-webhook-tls" $fullname) }}
{{- $data := (get ($existing | default dict) "data") | default dict }}
{{- if and (get $data "ca.crt") (get $data "tls.crt") (get $data "tls.key") }}
{{- dict "ca" (get $data "ca.crt") "crt" (get $data "tls.crt") "key" (get $data "tls.key") | toJson }}
{{- else }}
{{- $days := int .Values.webhook.certValidityDays }}
{{- $ca := genCA (printf "%s-webhook-ca" $fullname) $days }}
{{- $names := include "capmesh-control-plane.serverNames" . | fromJsonArray }}
{{- $cert := genSignedCert (printf "%s.%s.svc" $fullname .Release.Namespace) nil $names $days $ca }}
{{- dict "ca" ($ca.Cert | b64enc) "crt" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc) | toJson }}
{{- end }}
{{- end }}

{{- define "capmesh-control-plane.imagePullSecrets" -}}
{{- $g := .Values.global | default dict }}
{{- $secrets := concat ($g.imagePullSecrets | default list) (.Values.imagePullSecrets | default list) }}
{{- if $secrets }}
imagePullSecrets:
{{- range $secrets }}
{{- if kindIs "string" . }}
  - name: {{ . }}
{{- else }}
  - name: {{ .name }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "capmesh-control-plane.trustDomain" -}}
{{- $g := .Values.global | default dict }}
{{- $g.trustDomain | default .Values.controlPlane.trustDomain }}
{{- end }}

{{- define "capmesh-control-plane.logFormat" -}}
{{- $g := .Values.global | default dict }}
{{- $g.logFormat | default .Values.controlPlane.logFormat }}
{{- end }}

{{/* True (non-empty) when a PostgreSQL store is configured. */}}
{{- define "capmesh-control-plane.postgres" -}}
{{- $pg := .Values.store.postgres }}
{{- if or $pg.existingSecret $pg.host }}true{{ end }}
{{- end }}

{{/* The Secret holding the store key (--store-key-file); empty when there is none. */}}
{{- define "capmesh-control-plane.storeKeySecret" -}}
{{- if .Values.store.key.existingSecret }}
{{- .Values.store.key.existingSecret }}
{{- else if include "capmesh-control-plane.postgres" . }}
{{- printf "%s-store-key" (include "capmesh-control-plane.fullname" .) }}
{{- end }}
{{- end }}

{{- define "capmesh-control-plane.storeKeyKey" -}}
{{- if .Values.store.key.existingSecret }}{{ .Values.store.key.existingSecretKey }}{{ else }}store-key{{ end }}
{{- end }}

{{- define "capmesh-control-plane.adminTokenSecret" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin-token" (include "capmesh-control-plane.fullname" .)) }}
{{- end }}

{{- define "capmesh-control-plane.adminTokenKey" -}}
{{- if .Values.adminToken.existingSecret }}{{ .Values.adminToken.existingSecretKey }}{{ else }}admin-token{{ end }}
{{- end }}

{{/* The DNS names of the Service: the serving certificate carries all of them. */}}
{{- define "capmesh-control-plane.serverNames" -}}
{{- $name := include "capmesh-control-plane.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $names := list $name (printf "%s.%s" $name $ns) (printf "%s.%s.svc" $name $ns) (printf "%s.%s.svc.%s" $name $ns .Values.controlPlane.clusterDomain) }}
{{- range .Values.controlPlane.serverNames }}
{{- $names = append $names . }}
{{- end }}
{{- $names | uniq | toJson }}
{{- end }}

{{/* Fails the render when the settings cannot work together. */}}
{{- define "capmesh-control-plane.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not (include "capmesh-control-plane.postgres" .)) }}
{{- fail (printf "replicaCount is %d, but more than one control-plane replica needs a shared store: set store.postgres.host (or store.postgres.existingSecret), or use replicaCount: 1 with the SQLite store" (int .Values.replicaCount)) }}
{{- end }}
{{- if and .Values.store.postgres.host (not .Values.store.postgres.existingSecret) (not .Values.store.postgres.passwordSecret) }}
{{- fail "store.postgres.host is set but store.postgres.passwordSecret is empty: name the Secret holding the database password (key store.postgres.passwordSecretKey)" }}
{{- end }}
{{- end }}

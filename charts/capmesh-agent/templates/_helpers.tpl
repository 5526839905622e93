{{/* Chart name (the alias when used as a dependency of capmesh-platform). */}}
{{- define "capmesh-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name: fullnameOverride, the release name when it already contains the chart
name, else <release>-<name>. Truncated to a DNS label.
*/}}
{{- define "capmesh-agent.fullname" -}}
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

{{- define "capmesh-agent.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The agent's mesh name (a DNS label, checked by the schema). */}}
{{- define "capmesh-agent.agentName" -}}
{{- .Values.agent.name | default (include "capmesh-agent.name" .) }}
{{- end }}

{{- define "capmesh-agent.meshNamespace" -}}
{{- .Values.agent.namespace | default .Release.Namespace }}
{{- end }}

{{- define "capmesh-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "capmesh-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "capmesh-agent.labels" -}}
helm.sh/chart: {{ include "capmesh-agent.chart" . }}
{{ include "capmesh-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: capmesh
capmesh.io/agent: {{ include "capmesh-agent.agentName" . }}
{{- end }}

{{- define "capmesh-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "capmesh-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference. Call with (dict "image" .Values.x.image "root" . "capmesh" true):
global.imageRegistry overrides the registry; for capmesh images (capmesh: true) the tag falls
back to global.imageTag, then the chart's appVersion.
*/}}
{{- define "capmesh-agent.image" -}}
{{- $root := .root }}
{{- $g := $root.Values.global | default dict }}
{{- $registry := .image.registry | default "" }}
{{- if $g.imageRegistry }}{{ $registry = $g.imageRegistry }}{{ end }}
{{- $tag := .image.tag | default "" }}
{{- if and (not $tag) .capmesh }}{{ $tag = $g.imageTag | default $root.Chart.AppVersion }}{{ end }}
{{- $ref := .image.repository }}
{{- if $registry }}{{ $ref = printf "%s/%s" $registry $ref }}{{ end }}
{{- if $tag }}{{ $ref = printf "%s:%s" $ref $tag }}{{ end }}
{{- $ref }}
{{- end }}

{{- define "capmesh-agent.imagePullSecrets" -}}
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

{{- define "capmesh-agent.trustDomain" -}}
{{- $g := .Values.global | default dict }}
{{- $g.trustDomain | default .Values.proxy.trustDomain }}
{{- end }}

{{- define "capmesh-agent.logFormat" -}}
{{- $g := .Values.global | default dict }}
{{- $g.logFormat | default .Values.proxy.logFormat }}
{{- end }}

{{- define "capmesh-agent.controlPlaneUrl" -}}
{{- $g := .Values.global | default dict }}
{{- .Values.proxy.controlPlane.url | default (dig "controlPlane" "url" "" $g) | default "https://capmesh-control-plane:8000" }}
{{- end }}

{{- define "capmesh-agent.caSecret" -}}
{{- $g := .Values.global | default dict }}
{{- .Values.proxy.controlPlane.caSecret | default (dig "controlPlane" "caSecret" "" $g) | default "capmesh-ca" }}
{{- end }}

{{- define "capmesh-agent.bootstrapSecret" -}}
{{- $g := .Values.global | default dict }}
{{- .Values.proxy.bootstrapToken.secretName | default $g.bootstrapTokenSecret | default "capmesh-bootstrap-token" }}
{{- end }}

{{- define "capmesh-agent.propagateHeaders" -}}
{{- $g := .Values.global | default dict }}
{{- .Values.proxy.propagateHeaders | default $g.propagateHeaders | default list | join "," }}
{{- end }}

{{/* The agent's MCP URL as the proxy dials it, or "none" for a consumer-only agent. */}}
{{- define "capmesh-agent.agentUrl" -}}
{{- if .Values.agent.consumerOnly }}none{{ else }}http://127.0.0.1:{{ .Values.agent.port }}{{ .Values.agent.path }}{{ end }}
{{- end }}

{{/* Whether the agent serves inbound mesh calls (a Service is worth having). */}}
{{- define "capmesh-agent.servesInbound" -}}
{{- if and .Values.agent.enabled (not .Values.agent.consumerOnly) .Values.service.enabled }}true{{ end }}
{{- end }}

{{/*
The capmesh-proxy sidecar container. Every flag here is a real `capmesh-proxy` flag; the
charts test runs the binary's own parser over the rendered arguments.
*/}}
{{- define "capmesh-agent.proxyContainer" -}}
{{- $p := .Values.proxy }}
{{- $a := .Values.agent }}
{{- $headers := include "capmesh-agent.propagateHeaders" . -}}
- name: capmesh-proxy
  image: {{ include "capmesh-agent.image" (dict "image" $p.image "root" . "capmesh" true) | quote }}
  imagePullPolicy: {{ $p.image.pullPolicy }}
  {{- if $p.nativeSidecar }}
  # A native sidecar: starts (and passes its startup probe) before the agent, stops after it.
  restartPolicy: Always
  {{- end }}
  args:
    - --agent-name
    - {{ include "capmesh-agent.agentName" . | quote }}
    - --namespace
    - {{ include "capmesh-agent.meshNamespace" . | quote }}
    - --trust-domain
    - {{ include "capmesh-agent.trustDomain" . | quote }}
    - --agent-url
    - {{ include "capmesh-agent.agentUrl" . | quote }}
    - --control-plane
    - {{ include "capmesh-agent.controlPlaneUrl" . | quote }}
    - --control-plane-ca
    - /etc/capmesh/ca/ca.pem
    {{- if $p.certificate.secretName }}
    - --tls-cert
    - /etc/capmesh/tls/tls.crt
    - --tls-key
    - /etc/capmesh/tls/tls.key
    {{- if $p.certificate.caKey }}
    - --tls-ca
    - /etc/capmesh/tls/ca.crt
    {{- end }}
    {{- else }}
    - --bootstrap-token-file
    - /etc/capmesh/bootstrap/token
    {{- end }}
    # Other proxies dial this pod's IP (the kubelet expands $(POD_IP) from the env below).
    - --advertise
    - "$(POD_IP):{{ $p.ports.inbound }}"
    - --proxy-id
    - "$(POD_NAME)"
    - --outbound
    - "127.0.0.1:{{ $p.ports.outbound }}"
    - --inbound
    - "0.0.0.0:{{ $p.ports.inbound }}"
    # All interfaces: the kubelet's probes and Prometheus come from outside the pod.
    - --admin
    - "0.0.0.0:{{ $p.ports.admin }}"
    - --tls-mode
    - {{ $p.tlsMode | quote }}
    {{- with $a.tags }}
    - --tags
    - {{ join "," . | quote }}
    {{- end }}
    {{- with $a.version }}
    - --agent-version
    - {{ . | quote }}
    {{- end }}
    {{- with $a.zone }}
    - --zone
    - {{ . | quote }}
    {{- end }}
    {{- range $a.capabilities }}
    - --capability
    - {{ . | quote }}
    {{- end }}
    {{- range $a.dependencies }}
    - --dependency
    - {{ . | quote }}
    {{- end }}
    {{- with $headers }}
    - --propagate-headers
    - {{ . | quote }}
    {{- end }}
    - --log-format
    - {{ include "capmesh-agent.logFormat" . | quote }}
  env:
    - name: POD_IP
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: RUST_LOG
      value: {{ $p.logLevel | quote }}
    {{- with $p.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: mesh
      containerPort: {{ $p.ports.inbound }}
      protocol: TCP
    - name: proxy-admin
      containerPort: {{ $p.ports.admin }}
      protocol: TCP
  {{- if $p.nativeSidecar }}
  startupProbe:
    httpGet:
      path: /live
      port: proxy-admin
    {{- toYaml $p.startupProbe | nindent 4 }}
  {{- end }}
  livenessProbe:
    httpGet:
      path: /live
      port: proxy-admin
    {{- toYaml $p.livenessProbe | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /ready
      port: proxy-admin
    {{- toYaml $p.readinessProbe | nindent 4 }}
  resources:
    {{- toYaml $p.resources | nindent 4 }}
  securityContext:
    {{- toYaml $p.securityContext | nindent 4 }}
    runAsUser: {{ $p.uid }}
    runAsGroup: {{ $p.uid }}
  volumeMounts:
    - name: capmesh-ca
      mountPath: /etc/capmesh/ca
      readOnly: true
    {{- if $p.certificate.secretName }}
    - name: capmesh-tls
      mountPath: /etc/capmesh/tls
      readOnly: true
    {{- else }}
    - name: capmesh-bootstrap-token
      mountPath: /etc/capmesh/bootstrap
      readOnly: true
    {{- end }}
{{- end }}

{{/*
The init container of transparent mode: `capmesh-proxy init` writes the iptables rules that send
the pod's TCP through the proxy (outbound to --outbound-port, inbound to --inbound-port), except
the proxy's own (--proxy-uid) and the admin port. `capmesh inject` and the admission webhook
add the same container (control-plane/src/inject.rs).
*/}}
{{- define "capmesh-agent.initContainer" -}}
{{- $p := .Values.proxy -}}
{{- $t := .Values.transparent -}}
- name: capmesh-init
  image: {{ include "capmesh-agent.image" (dict "image" $p.image "root" . "capmesh" true) | quote }}
  imagePullPolicy: {{ $p.image.pullPolicy }}
  args:
    - init
    - --proxy-uid
    - {{ $p.uid | quote }}
    - --outbound-port
    - {{ $p.ports.outbound | quote }}
    - --inbound-port
    - {{ $p.ports.inbound | quote }}
    - --skip-inbound-ports
    - {{ $p.ports.admin | quote }}
    {{- with $t.skipOutboundPorts }}
    - --skip-outbound-ports
    - {{ join "," . | quote }}
    {{- end }}
    {{- with $t.skipOutboundCidrs }}
    - --skip-outbound-cidrs
    - {{ join "," . | quote }}
    {{- end }}
    {{- range $t.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      cpu: 100m
      memory: 32Mi
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    runAsNonRoot: false
    runAsUser: 0
    capabilities:
      drop:
        - ALL
      add:
        - NET_ADMIN
        - NET_RAW
{{- end }}

{{/* The volumes the sidecar mounts. */}}
{{- define "capmesh-agent.proxyVolumes" -}}
{{- $p := .Values.proxy -}}
- name: capmesh-ca
  secret:
    secretName: {{ include "capmesh-agent.caSecret" . }}
    defaultMode: 0444
    items:
      - key: {{ $p.controlPlane.caKey }}
        path: ca.pem
{{- if $p.certificate.secretName }}
- name: capmesh-tls
  secret:
    secretName: {{ $p.certificate.secretName }}
    defaultMode: 0444
    items:
      - key: {{ $p.certificate.certKey }}
        path: tls.crt
      - key: {{ $p.certificate.keyKey }}
        path: tls.key
      {{- if $p.certificate.caKey }}
      - key: {{ $p.certificate.caKey }}
        path: ca.crt
      {{- end }}
{{- else }}
- name: capmesh-bootstrap-token
  secret:
    secretName: {{ include "capmesh-agent.bootstrapSecret" . }}
    defaultMode: 0444
    items:
      - key: {{ $p.bootstrapToken.key }}
        path: token
{{- end }}
{{- end }}

{{/* Pod annotations: Prometheus scraping of the proxy's admin port. */}}
{{- define "capmesh-agent.podAnnotations" -}}
{{- if .Values.metrics.enabled -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.proxy.ports.admin | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

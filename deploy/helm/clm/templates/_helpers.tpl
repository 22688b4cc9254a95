{{/*
Naming, labels and the pieces every per-service template shares. Per-service
helpers take a dict: root (the top context), name (the service key in
.Values.services) and svc (that service's values).
*/}}

{{- define "clm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Name prefix of every resource: the release name, plus the chart name unless the release already contains it. */}}
{{- define "clm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "clm.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of a service's Deployment, Service, ServiceAccount, Secret, …: <fullname>-<service>. */}}
{{- define "clm.serviceFullname" -}}
{{- printf "%s-%s" (include "clm.fullname" .root) .name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "clm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select one service's pods (component = the service name). */}}
{{- define "clm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clm.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{/* Every label of a resource that belongs to one service. */}}
{{- define "clm.labels" -}}
{{ include "clm.selectorLabels" . }}
app.kubernetes.io/part-of: clm
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "clm.chart" .root }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The image reference: repository, then @digest or :tag (default: appVersion). */}}
{{- define "clm.image" -}}
{{- $image := .Values.image -}}
{{- $tag := default .Chart.AppVersion $image.tag | toString -}}
{{- if eq $tag "latest" -}}
{{- fail "image.tag: `latest` is not allowed; set an immutable version tag or image.digest" -}}
{{- end -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Enabled services that call the given one, sorted, as a JSON list. */}}
{{- define "clm.callers" -}}
{{- $callers := list -}}
{{- range $other, $otherSvc := .root.Values.services -}}
{{- if and $otherSvc.enabled (has $.name $otherSvc.calls) -}}
{{- $callers = append $callers $other -}}
{{- end -}}
{{- end -}}
{{- $callers | sortAlpha | toJson -}}
{{- end -}}

{{/* Refuses values that would render a broken release; called once per render. */}}
{{- define "clm.validate" -}}
{{- $any := false -}}
{{- range $name, $svc := .Values.services -}}
{{- if $svc.enabled -}}
{{- $any = true -}}
{{- range $callee := $svc.calls -}}
{{- $calleeSvc := index $.Values.services $callee -}}
{{- if not $calleeSvc.enabled -}}
{{- fail (printf "services.%s calls %s, but services.%s.enabled is false: enable it or disable %s" $name $callee $callee $name) -}}
{{- end -}}
{{- end -}}
{{- if and (not $svc.database.existingSecret.name) (not $svc.database.url) -}}
{{- fail (printf "services.%s.database: set existingSecret.name (production) or url (dev)" $name) -}}
{{- end -}}
{{- range $envName, $source := $svc.secretEnv -}}
{{- if not (or (dig "existingSecret" "name" "" $source) (dig "value" "" $source) (dig "generate" false $source)) -}}
{{- fail (printf "services.%s.secretEnv.%s: set existingSecret.name, value or generate: true" $name $envName) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not $any -}}
{{- fail "services: enable at least one service" -}}
{{- end -}}
{{- end -}}

{{/* Seconds Kubernetes waits between the start of termination and SIGKILL. */}}
{{- define "clm.terminationGracePeriodSeconds" -}}
{{- $c := .Values.config -}}
{{- add $c.preStopSleepSeconds $c.shutdownDelaySeconds $c.shutdownGraceSeconds $c.terminationSlackSeconds -}}
{{- end -}}

{{/* Whether the chart's own Secret of a service holds anything: "true" or "". */}}
{{- define "clm.hasChartSecret" -}}
{{- $v := .root.Values -}}
{{- $need := false -}}
{{- if not .svc.database.existingSecret.name -}}{{- $need = true -}}{{- end -}}
{{- if and (dig "usesRedis" true .svc) $v.redis.url (not $v.redis.existingSecret.name) -}}{{- $need = true -}}{{- end -}}
{{- range $envName, $source := .svc.secretEnv -}}
{{- if not (dig "existingSecret" "name" "" $source) -}}{{- $need = true -}}{{- end -}}
{{- end -}}
{{- if $need -}}true{{- end -}}
{{- end -}}

{{/*
The container environment of a service, shared by its Deployment and its
migration Job. POD_NAME and POD_NAMESPACE come first so later values can use
$(POD_NAME) expansion.
*/}}
{{- define "clm.env" -}}
{{- $v := .root.Values -}}
{{- $secretName := include "clm.serviceFullname" . -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: CLM_LISTEN_ADDR
  value: {{ printf "0.0.0.0:%d" (int $v.grpc.port) | quote }}
- name: CLM_LOG_FORMAT
  value: {{ $v.config.logFormat | quote }}
- name: CLM_LOG
  value: {{ $v.config.logFilter | quote }}
- name: CLM_MIGRATE_ON_START
  value: "false"
- name: CLM_SHUTDOWN_GRACE_SECONDS
  value: {{ $v.config.shutdownGraceSeconds | quote }}
- name: CLM_SHUTDOWN_DELAY_SECONDS
  value: {{ $v.config.shutdownDelaySeconds | quote }}
- name: CLM_DATA_DIR
  value: /tmp/clm
- name: CLM_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- if .svc.database.existingSecret.name }}
      name: {{ .svc.database.existingSecret.name }}
      key: {{ .svc.database.existingSecret.key }}
      {{- else }}
      name: {{ $secretName }}
      key: database-url
      {{- end }}
{{- if not (dig "usesRedis" true .svc) }}
{{- /* A service that keeps no cache in Redis gets neither its URL nor a route to it
       (usesRedis missing, as in values reused from an older release: true). */}}
{{- else if $v.redis.existingSecret.name }}
- name: CLM_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.existingSecret.name }}
      key: {{ $v.redis.existingSecret.key }}
{{- else if $v.redis.url }}
- name: CLM_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secretName }}
      key: redis-url
{{- end }}
{{- range $envName, $source := .svc.secretEnv }}
- name: {{ $envName }}
  valueFrom:
    secretKeyRef:
      {{- if (dig "existingSecret" "name" "" $source) }}
      name: {{ (dig "existingSecret" "name" "" $source) }}
      key: {{ (dig "existingSecret" "key" "" $source) }}
      {{- else }}
      name: {{ $secretName }}
      key: {{ $envName }}
      {{- end }}
{{- end }}
{{- with $v.config.phoneDefaultRegion }}
- name: CLM_PHONE_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- /* The callee's Service by its in-namespace DNS name; CLM_IDENTITY_URL is what the binary reads for identity. */}}
{{- range $callee := .svc.calls | sortAlpha }}
- name: {{ printf "CLM_%s_URL" (upper $callee) }}
  value: {{ printf "http://%s:%d" (include "clm.serviceFullname" (dict "root" $.root "name" $callee)) (int $v.grpc.port) | quote }}
{{- end }}
{{- if $v.otel.enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $v.otel.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "%s%s" $v.otel.serviceNamePrefix .name | quote }}
{{- $attributes := list "service.namespace=clm" (printf "service.version=%s" .root.Chart.AppVersion) "k8s.namespace.name=$(POD_NAMESPACE)" "k8s.pod.name=$(POD_NAME)" }}
{{- range $key, $value := $v.otel.resourceAttributes }}
{{- $attributes = append $attributes (printf "%s=%s" $key (toString $value)) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attributes | quote }}
{{- end }}
{{- with $v.config.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with .svc.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "clm.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "clm.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* A NetworkPolicy egress rule: ports plus optional peers (none: any destination). */}}
{{- define "clm.egressRule" -}}
{{- if .to -}}
- to:
    {{- toYaml .to | nindent 4 }}
  ports:
{{- else -}}
- ports:
{{- end }}
    {{- range .ports }}
    - protocol: TCP
      port: {{ . }}
    {{- end }}
{{- end -}}

{{/* Egress every clm pod needs: DNS, its database, Redis when configured and used, the OTLP collector when enabled. */}}
{{- define "clm.baseEgress" -}}
{{- $v := .root.Values -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ $v.networkPolicy.dns.namespace }}
      {{- with $v.networkPolicy.dns.podLabels }}
      podSelector:
        matchLabels:
          {{- toYaml . | nindent 10 }}
      {{- end }}
  ports:
    - protocol: UDP
      port: {{ $v.networkPolicy.dns.port }}
    - protocol: TCP
      port: {{ $v.networkPolicy.dns.port }}
{{ include "clm.egressRule" .svc.database.egress }}
{{- if and (dig "usesRedis" true .svc) (or $v.redis.url $v.redis.existingSecret.name) }}
{{ include "clm.egressRule" $v.redis.egress }}
{{- end }}
{{- if $v.otel.enabled }}
{{ include "clm.egressRule" $v.otel.egress }}
{{- end }}
{{- end -}}

{{/* Configuration digest for the pod template: a change rolls the pods. */}}
{{- define "clm.configChecksum" -}}
{{- $v := .root.Values -}}
{{- dict "svc" .svc "config" $v.config "redis" $v.redis "otel" $v.otel "grpc" $v.grpc | toJson | sha256sum -}}
{{- end -}}

{{/* Names and labels. */}}
{{- define "repairy-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "repairy-gateway.fullname" -}}
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

{{- define "repairy-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "repairy-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "repairy-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "repairy-gateway.labels" -}}
helm.sh/chart: {{ include "repairy-gateway.chart" . }}
{{ include "repairy-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "repairy-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "repairy-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "repairy-gateway.credentialsSecret" -}}
{{- .Values.credentials.existingSecret | default (printf "%s-credentials" (include "repairy-gateway.fullname" .)) }}
{{- end }}

{{- define "repairy-gateway.clientKeysSecret" -}}
{{- if .Values.inbound.clientKeysSecret }}
{{- .Values.inbound.clientKeysSecret }}
{{- else if .Values.inbound.clientKeys }}
{{- printf "%s-client-keys" (include "repairy-gateway.fullname" .) }}
{{- end }}
{{- end }}

{{/* The Redis port, from redis.url (6379 when it names none). */}}
{{- define "repairy-gateway.redisPort" -}}
{{- $host := (urlParse .Values.redis.url).host -}}
{{- if regexMatch ":[0-9]+$" $host }}{{ regexFind "[0-9]+$" $host }}{{ else }}6379{{ end -}}
{{- end }}

{{/* The image reference; "appVersion" is passed in because a parent chart's .Chart differs. */}}
{{- define "repairy-gateway.image" -}}
{{- if .v.image.digest }}
{{- printf "%s:%s@%s" .v.image.repository (.v.image.tag | default .appVersion) .v.image.digest }}
{{- else }}
{{- printf "%s:%s" .v.image.repository (.v.image.tag | default .appVersion) }}
{{- end }}
{{- end }}

{{/* This chart's appVersion, for callers that render the sidecar from another chart. */}}
{{- define "repairy-gateway.appVersion" -}}0.1.0{{- end }}

{{/*
Settings as environment variables, a YAML map. Dict arguments:
  v: values shaped like this chart's; listen: proxy listen address; clientKeys: bool.
*/}}
{{- define "repairy-gateway.settingsEnv" -}}
{{- $v := .v -}}
REPAIRY_BASE_URL: {{ required "repairy.baseUrl is required" $v.repairy.baseUrl | quote }}
REPAIRY_APP_KEY_FILE: "/etc/repairy-gateway/credentials/app-key"
REPAIRY_APP_SECRET_FILE: "/etc/repairy-gateway/credentials/app-secret"
REPAIRY_PARTNER_ID_FILE: "/etc/repairy-gateway/credentials/partner-id"
GATEWAY_LISTEN: {{ .listen | quote }}
GATEWAY_ADMIN_LISTEN: {{ printf "0.0.0.0:%v" $v.gateway.adminPort | quote }}
GATEWAY_LOG_LEVEL: {{ $v.gateway.logLevel | quote }}
GATEWAY_LOG_FORMAT: {{ $v.gateway.logFormat | quote }}
GATEWAY_AUDIT_LOG: {{ $v.gateway.auditLog | quote }}
GATEWAY_SHUTDOWN_DELAY: {{ printf "%vs" $v.gateway.shutdownDelaySeconds | quote }}
GATEWAY_SHUTDOWN_GRACE: {{ printf "%vs" $v.gateway.shutdownGraceSeconds | quote }}
{{- if and $v.gateway.persistToken (not $v.redis.url) }}
GATEWAY_TOKEN_FILE: "/var/lib/repairy-gateway/token.json"
{{- end }}
{{- with $v.credentials.profiles }}
{{- $names := list }}
{{- range . }}
{{- if has .name $names }}{{ fail (printf "credentials.profiles: %s is listed twice" .name) }}{{ end }}
{{- $names = append $names .name }}
{{- end }}
GATEWAY_PROFILES: {{ join "," $names | quote }}
{{- end }}
{{- range $v.credentials.profiles }}
{{- $up := upper .name }}
{{- $dir := printf "/etc/repairy-gateway/profiles/%s" .name }}
REPAIRY_PROFILE_{{ $up }}_APP_KEY_FILE: {{ printf "%s/app-key" $dir | quote }}
REPAIRY_PROFILE_{{ $up }}_APP_SECRET_FILE: {{ printf "%s/app-secret" $dir | quote }}
REPAIRY_PROFILE_{{ $up }}_PARTNER_ID_FILE: {{ printf "%s/partner-id" $dir | quote }}
{{- with .baseUrl }}
REPAIRY_PROFILE_{{ $up }}_BASE_URL: {{ . | quote }}
{{- end }}
{{- if .required }}
REPAIRY_PROFILE_{{ $up }}_REQUIRED: "true"
{{- end }}
{{- if and $v.gateway.persistToken (not $v.redis.url) }}
REPAIRY_PROFILE_{{ $up }}_TOKEN_FILE: {{ printf "/var/lib/repairy-gateway/token-%s.json" .name | quote }}
{{- end }}
{{- end }}
{{- with $v.inbound.clientProfiles }}
GATEWAY_CLIENT_PROFILES: {{ join "," . | quote }}
{{- end }}
{{- if $v.redis.url }}
GATEWAY_REDIS_URL: {{ $v.redis.url | quote }}
GATEWAY_REDIS_DOWN_POLICY: {{ $v.redis.downPolicy | quote }}
GATEWAY_REDIS_LEASE_TTL: {{ $v.redis.leaseTtl | quote }}
GATEWAY_REDIS_KEY_PREFIX: {{ $v.redis.keyPrefix | quote }}
{{- if $v.redis.passwordSecret }}
GATEWAY_REDIS_PASSWORD_FILE: "/etc/repairy-gateway/redis/password"
{{- end }}
{{- if $v.redis.storeKeySecret }}
GATEWAY_STORE_KEY_FILE: "/etc/repairy-gateway/store-key/store-key"
{{- end }}
{{- if $v.redis.caSecret }}
GATEWAY_REDIS_CA_FILE: "/etc/repairy-gateway/redis-ca/ca.crt"
{{- end }}
{{- end }}
{{- if .clientKeys }}
GATEWAY_CLIENT_KEYS_FILE: "/etc/repairy-gateway/client-keys/client-keys"
{{- end }}
{{- if $v.egressProxy.url }}
GATEWAY_EGRESS_PROXY: {{ $v.egressProxy.url | quote }}
{{- if $v.egressProxy.passwordSecret }}
GATEWAY_EGRESS_PROXY_PASSWORD_FILE: "/etc/repairy-gateway/egress-proxy/password"
{{- end }}
{{- end }}
{{- with $v.inbound.allowedCidrs }}
GATEWAY_ALLOWED_CIDRS: {{ join "," . | quote }}
{{- end }}
{{- with $v.inbound.allowedRoutes }}
GATEWAY_ALLOWED_ROUTES: {{ join "," . | quote }}
{{- end }}
{{- range $name, $value := $v.gateway.extraSettings }}
{{ $name }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/*
One gateway container (a list item). Dict arguments:
  v: values; name; image; listen; configMap: name to take settings from, or "" for inline env;
  clientKeys: bool; sidecar: bool (native sidecar: restartPolicy Always).
*/}}
{{- define "repairy-gateway.container" -}}
{{- $v := .v -}}
{{- /* In someone else's pod, port names that cannot clash with the app's. */}}
{{- $admin := ternary "gw-admin" "admin" (.sidecar | default false) -}}
{{- $proxy := ternary "gw-proxy" "proxy" (.sidecar | default false) -}}
- name: {{ .name }}
  image: {{ .image | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if .sidecar }}
  restartPolicy: Always
  {{- end }}
  args: ["serve"]
  {{- if or .configMap $v.extraEnvFrom }}
  envFrom:
    {{- if .configMap }}
    - configMapRef:
        name: {{ .configMap }}
    {{- end }}
    {{- with $v.extraEnvFrom }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- if or (not .configMap) $v.extraEnv }}
  env:
    {{- if not .configMap }}
    {{- range $name, $value := (include "repairy-gateway.settingsEnv" . | fromYaml) }}
    - name: {{ $name }}
      value: {{ $value | toString | quote }}
    {{- end }}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  ports:
    - name: {{ $proxy }}
      containerPort: {{ $v.gateway.port }}
      protocol: TCP
    - name: {{ $admin }}
      containerPort: {{ $v.gateway.adminPort }}
      protocol: TCP
  {{- if $v.startupProbe.enabled }}
  startupProbe:
    httpGet:
      path: /startz
      port: {{ $admin }}
    periodSeconds: {{ $v.startupProbe.periodSeconds }}
    timeoutSeconds: {{ $v.startupProbe.timeoutSeconds }}
    failureThreshold: {{ max 1 (div (add $v.startupProbe.budgetSeconds $v.startupProbe.periodSeconds -1) $v.startupProbe.periodSeconds) }}
  {{- end }}
  {{- if $v.livenessProbe.enabled }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ $admin }}
    initialDelaySeconds: {{ $v.livenessProbe.initialDelaySeconds }}
    periodSeconds: {{ $v.livenessProbe.periodSeconds }}
    timeoutSeconds: {{ $v.livenessProbe.timeoutSeconds }}
    failureThreshold: {{ $v.livenessProbe.failureThreshold }}
  {{- end }}
  {{- if $v.readinessProbe.enabled }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ $admin }}
    initialDelaySeconds: {{ $v.readinessProbe.initialDelaySeconds }}
    periodSeconds: {{ $v.readinessProbe.periodSeconds }}
    timeoutSeconds: {{ $v.readinessProbe.timeoutSeconds }}
    failureThreshold: {{ $v.readinessProbe.failureThreshold }}
  {{- end }}
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: repairy-credentials
      mountPath: /etc/repairy-gateway/credentials
      readOnly: true
    {{- range $v.credentials.profiles }}
    - name: {{ printf "repairy-profile-%s" (.name | replace "_" "-") }}
      mountPath: {{ printf "/etc/repairy-gateway/profiles/%s" .name }}
      readOnly: true
    {{- end }}
    {{- if .clientKeys }}
    - name: repairy-client-keys
      mountPath: /etc/repairy-gateway/client-keys
      readOnly: true
    {{- end }}
    {{- if $v.gateway.persistToken }}
    - name: repairy-state
      mountPath: /var/lib/repairy-gateway
    {{- end }}
    {{- if and $v.redis.url $v.redis.passwordSecret }}
    - name: repairy-redis-password
      mountPath: /etc/repairy-gateway/redis
      readOnly: true
    {{- end }}
    {{- if and $v.redis.url $v.redis.storeKeySecret }}
    - name: repairy-store-key
      mountPath: /etc/repairy-gateway/store-key
      readOnly: true
    {{- end }}
    {{- if and $v.redis.url $v.redis.caSecret }}
    - name: repairy-redis-ca
      mountPath: /etc/repairy-gateway/redis-ca
      readOnly: true
    {{- end }}
    {{- if and $v.egressProxy.url $v.egressProxy.passwordSecret }}
    - name: repairy-egress-proxy
      mountPath: /etc/repairy-gateway/egress-proxy
      readOnly: true
    {{- end }}
    {{- with $v.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* The pod volumes the container mounts. Dict: v, secretName, clientKeysSecret. */}}
{{- define "repairy-gateway.volumes" -}}
{{- $v := .v -}}
- name: repairy-credentials
  secret:
    secretName: {{ .secretName }}
    defaultMode: 288  # 0440: readable by the gateway's group (fsGroup) only
    items:
      - key: {{ $v.credentials.secretKeys.appKey }}
        path: app-key
      - key: {{ $v.credentials.secretKeys.appSecret }}
        path: app-secret
      - key: {{ $v.credentials.secretKeys.partnerId }}
        path: partner-id
{{- range $v.credentials.profiles }}
- name: {{ printf "repairy-profile-%s" (.name | replace "_" "-") }}
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 288
    items:
      - key: {{ $v.credentials.secretKeys.appKey }}
        path: app-key
      - key: {{ $v.credentials.secretKeys.appSecret }}
        path: app-secret
      - key: {{ $v.credentials.secretKeys.partnerId }}
        path: partner-id
{{- end }}
{{- if .clientKeysSecret }}
- name: repairy-client-keys
  secret:
    secretName: {{ .clientKeysSecret }}
    defaultMode: 288
    items:
      - key: client-keys
        path: client-keys
{{- end }}
{{- if $v.gateway.persistToken }}
- name: repairy-state
  emptyDir:
    medium: Memory  # the token stays off the node's disk; survives container restarts
    sizeLimit: 1Mi
{{- end }}
{{- if and $v.redis.url $v.redis.passwordSecret }}
- name: repairy-redis-password
  secret:
    secretName: {{ $v.redis.passwordSecret }}
    defaultMode: 288
    items:
      - key: {{ $v.redis.passwordKey }}
        path: password
{{- end }}
{{- if and $v.redis.url $v.redis.storeKeySecret }}
- name: repairy-store-key
  secret:
    secretName: {{ $v.redis.storeKeySecret }}
    defaultMode: 288
    items:
      - key: {{ $v.redis.storeKeyKey }}
        path: store-key
{{- end }}
{{- if and $v.redis.url $v.redis.caSecret }}
- name: repairy-redis-ca
  secret:
    secretName: {{ $v.redis.caSecret }}
    defaultMode: 292
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- if and $v.egressProxy.url $v.egressProxy.passwordSecret }}
- name: repairy-egress-proxy
  secret:
    secretName: {{ $v.egressProxy.passwordSecret }}
    defaultMode: 288
    items:
      - key: {{ $v.egressProxy.passwordKey }}
        path: password
{{- end }}
{{- with $v.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

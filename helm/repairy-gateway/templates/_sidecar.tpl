{{/*
Sidecar mode: templates another chart includes to add the gateway to its own pod.

Add this chart as a dependency (with `repairy-gateway.standalone: false`), then in your pod spec:

  initContainers:
    {{- include "repairy-gateway.sidecar.container" (dict "values" (index .Values "repairy-gateway") "replicas" .Values.replicaCount "autoscaling" false) | nindent 4 }}
  volumes:
    {{- include "repairy-gateway.sidecar.volumes" (dict "values" (index .Values "repairy-gateway")) | nindent 4 }}

`replicas` (your Deployment's replica count) and `autoscaling` (true when an HPA may scale
it) are required: each pod's gateway keeps a token of its own unless they share Redis, and
against an API that keeps one live token per credential they would revoke each other. More
than one pod possible without `redis.url` and `redis.passwordSecret` is a render error
(`redis.allowUnsharedReplicas: true` opts out). Native sidecars need Kubernetes 1.29 or later.

The gateway runs as a native sidecar (an init container with restartPolicy: Always), so it
starts before your app and stops after it; it listens on 127.0.0.1:<gateway.port> only.
Credentials must come from credentials.existingSecret.

Consider `enableServiceLinks: false` in your pod spec: Kubernetes otherwise sets
<SERVICE>_SERVICE_HOST and friends for every Service in the namespace. The gateway ignores
names of that shape (a Service named "gateway" gives GATEWAY_SERVICE_HOST, not a setting),
but your app gets them too.
*/}}
{{- define "repairy-gateway.sidecar.container" -}}
{{- $v := .values -}}
{{- if not (hasKey . "replicas") -}}
{{- fail "repairy-gateway sidecar: pass \"replicas\" (your Deployment's replica count) and \"autoscaling\" (true if an HPA scales it) to repairy-gateway.sidecar.container" -}}
{{- end -}}
{{- if not (hasKey . "autoscaling") -}}
{{- fail "repairy-gateway sidecar: pass \"autoscaling\" (true if an HPA scales your Deployment) to repairy-gateway.sidecar.container" -}}
{{- end -}}
{{- if and (or (gt (int .replicas) 1) .autoscaling) (not $v.redis.allowUnsharedReplicas) (or (not $v.redis.url) (not $v.redis.passwordSecret)) -}}
{{- fail "repairy-gateway sidecar: more than one pod (replicas > 1 or autoscaling) needs redis.url and redis.passwordSecret: one shared token for all the pods' gateways (with one token each they revoke each other where the API keeps one live token per credential). Set redis.allowUnsharedReplicas=true to opt out." -}}
{{- end -}}
{{- if not $v.credentials.existingSecret -}}
{{- fail "repairy-gateway sidecar: set credentials.existingSecret (a Secret with app-key, app-secret, partner-id)" -}}
{{- end -}}
{{- $image := include "repairy-gateway.image" (dict "v" $v "appVersion" (include "repairy-gateway.appVersion" .)) -}}
{{- include "repairy-gateway.container" (dict "v" $v "name" "repairy-gateway" "image" $image "listen" (printf "127.0.0.1:%v" $v.gateway.port) "configMap" "" "clientKeys" false "sidecar" true) }}
{{- end }}

{{- define "repairy-gateway.sidecar.volumes" -}}
{{- $v := .values -}}
{{- include "repairy-gateway.volumes" (dict "v" $v "secretName" $v.credentials.existingSecret "clientKeysSecret" "") }}
{{- end }}

{{/* Names, labels, images, pools and the pieces every pod shares. */}}

{{- define "crossdraft.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* RELEASE-crossdraft, or RELEASE when it already contains the chart name; 40 characters at most, so
that a role and a pool name fit in 63. */}}
{{- define "crossdraft.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object that belongs to no one role. */}}
{{- define "crossdraft.labels" -}}
app.kubernetes.io/name: {{ include "crossdraft.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "crossdraft.metaLabels" . }}
{{- end -}}

{{/* The labels that select nothing: chart, version, manager, commonLabels. */}}
{{- define "crossdraft.metaLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: crossdraft
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one role: (dict "root" $ "component" "gateway" ["pool" NAME]). */}}
{{- define "crossdraft.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crossdraft.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- if .pool }}
crossdraft.io/pool: {{ .pool }}
{{- end }}
{{- end -}}

{{- define "crossdraft.componentLabels" -}}
{{ include "crossdraft.metaLabels" .root }}
{{ include "crossdraft.selectorLabels" . }}
{{- end -}}

{{- define "crossdraft.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "crossdraft.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image of a role: (dict "root" $ "role" .Values.ROLE "gpu" N). A role's own fields win; a pod with
GPUs gets the global tag plus image.cudaTagSuffix. */}}
{{- define "crossdraft.image" -}}
{{- $g := .root.Values.image -}}
{{- $r := .role.image | default dict -}}
{{- $repo := $r.repository | default $g.repository -}}
{{- $tag := $r.tag -}}
{{- if not $tag -}}
{{- $tag = $g.tag | default .root.Chart.AppVersion -}}
{{- if gt (int (.gpu | default 0)) 0 -}}
{{- $tag = printf "%s%s" $tag $g.cudaTagSuffix -}}
{{- end -}}
{{- end -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "crossdraft.pullPolicy" -}}
{{- (.role.image | default dict).pullPolicy | default .root.Values.image.pullPolicy -}}
{{- end -}}

{{/* Drafter pools as JSON {"pools": [...]}: each pool merged over the drafter defaults (the pool wins;
maps merge). */}}
{{- define "crossdraft.drafterPools" -}}
{{- $defaults := omit .Values.drafter "pools" -}}
{{- $names := list -}}
{{- $out := list -}}
{{- range $i, $p := .Values.drafter.pools -}}
{{- $name := required (printf "drafter.pools[%d].name is required" $i) $p.name -}}
{{- if has $name $names -}}
{{- fail (printf "drafter.pools: the name %q is used twice" $name) -}}
{{- end -}}
{{- $_ := required (printf "drafter.pools[%d] (%s): model is required" $i $name) $p.model -}}
{{- $names = append $names $name -}}
{{- $out = append $out (mergeOverwrite (deepCopy $defaults) (deepCopy $p)) -}}
{{- end -}}
{{- if not $out -}}
{{- fail "drafter.pools: give at least one drafter pool" -}}
{{- end -}}
{{- dict "pools" $out | toJson -}}
{{- end -}}

{{- define "crossdraft.drafterName" -}}
{{- printf "%s-drafter-%s" (include "crossdraft.fullname" .root) .pool.name -}}
{{- end -}}

{{- define "crossdraft.verifierName" -}}
{{- printf "%s-verifier" (include "crossdraft.fullname" .) -}}
{{- end -}}

{{/* The Secret with the verdict key (--verdict-key-file of the gateway and the verifiers, never the drafters). */}}
{{- define "crossdraft.verdictKeySecret" -}}
{{- .Values.verdictKey.existingSecret | default (printf "%s-verdict-key" (include "crossdraft.fullname" .)) -}}
{{- end -}}

{{- define "crossdraft.verdictKeyArgs" -}}
{{- if .Values.verdictKey.enabled }}
- --verdict-key-file=/etc/crossdraft/verdict/key
{{- end }}
{{- end -}}

{{- define "crossdraft.verdictKeyMount" -}}
{{- if .Values.verdictKey.enabled }}
- name: verdict-key
  mountPath: /etc/crossdraft/verdict
  readOnly: true
{{- end }}
{{- end -}}

{{- define "crossdraft.verdictKeyVolume" -}}
{{- if .Values.verdictKey.enabled }}
# the key verifiers seal verdicts with and gateways check them with (crossdraft/seal.py)
- name: verdict-key
  secret:
    secretName: {{ include "crossdraft.verdictKeySecret" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.verdictKey.existingSecretKey }}
        path: key
{{- end }}
{{- end -}}

{{- define "crossdraft.redisName" -}}
{{- printf "%s-redis" (include "crossdraft.fullname" .) -}}
{{- end -}}

{{/* --drafters under gateway.discovery: kubernetes, each pool's Service and its port name (its
EndpointSlices are watched); dns and static, each pool's headless Service name (DNS resolves it to the
pool's ready pods). */}}
{{- define "crossdraft.drafterAddresses" -}}
{{- $root := . -}}
{{- $addrs := list -}}
{{- range (include "crossdraft.drafterPools" . | fromJson).pools -}}
{{- $svc := include "crossdraft.drafterName" (dict "root" $root "pool" .) -}}
{{- if eq $root.Values.gateway.discovery "kubernetes" -}}
{{- $addrs = append $addrs (printf "%s:grpc" $svc) -}}
{{- else -}}
{{- $addrs = append $addrs (printf "%s.%s.svc.%s:%d" $svc $root.Release.Namespace $root.Values.clusterDomain (int .port)) -}}
{{- end -}}
{{- end -}}
{{- join "," $addrs -}}
{{- end -}}

{{/* --verifiers: kubernetes, the verifiers' Service and its port name; dns, its headless name (every
ready verifier pod, so one added later is seen); static, the stable DNS name of every pod of the
StatefulSet (a `helm upgrade` to add one). */}}
{{- define "crossdraft.verifierAddresses" -}}
{{- $name := include "crossdraft.verifierName" . -}}
{{- $port := int .Values.verifier.port -}}
{{- if eq .Values.gateway.discovery "kubernetes" -}}
{{- printf "%s:grpc" $name -}}
{{- else if eq .Values.gateway.discovery "dns" -}}
{{- printf "%s.%s.svc.%s:%d" $name .Release.Namespace .Values.clusterDomain $port -}}
{{- else -}}
{{- $addrs := list -}}
{{- range $i := until (int .Values.verifier.replicas) -}}
{{- $addrs = append $addrs (printf "%s-%d.%s.%s.svc.%s:%d" $name $i $name $.Release.Namespace $.Values.clusterDomain $port) -}}
{{- end -}}
{{- join "," $addrs -}}
{{- end -}}
{{- end -}}

{{/* The gateway's own ServiceAccount under gateway.discovery: kubernetes (it reads EndpointSlices). */}}
{{- define "crossdraft.gatewayServiceAccountName" -}}
{{- printf "%s-gateway" (include "crossdraft.fullname" .) -}}
{{- end -}}

{{/* Redis: URL (never with a password), and the Secret holding the password (empty: none). */}}
{{- define "crossdraft.redisURL" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s.%s.svc.%s:6379/0" (include "crossdraft.redisName" .) .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
{{- $url := required "redis.external.url is required when redis.enabled is false" .Values.redis.external.url -}}
{{- if regexMatch "^[a-z]+://[^/@]*:[^/@]*@" $url -}}
{{- fail "redis.external.url must not contain a password: put it in a Secret and name it in redis.external.existingSecret" -}}
{{- end -}}
{{- $url -}}
{{- end -}}
{{- end -}}

{{- define "crossdraft.redisSecretName" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.auth.existingSecret | default (include "crossdraft.redisName" .) -}}
{{- else -}}
{{- .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "crossdraft.redisSecretKey" -}}
{{- if .Values.redis.enabled -}}
{{- .Values.redis.auth.existingSecretPasswordKey -}}
{{- else -}}
{{- .Values.redis.external.existingSecretPasswordKey -}}
{{- end -}}
{{- end -}}

{{/* A probe of the gRPC health service on PORT with the role's settings merged in:
(dict "root" $ "port" N "settings" MAP). Kubernetes' gRPC probes speak only plaintext: with `tls.enabled`
it is an exec probe of the image's crossdraft-healthcheck, which speaks mutual TLS with the service's
own certificate and its --tls-* flags (docker/healthcheck.py). */}}
{{- define "crossdraft.grpcProbe" -}}
{{- if and .root .root.Values.tls.enabled -}}
{{- $exec := dict "exec" (dict "command" (list "python" "/opt/crossdraft/bin/crossdraft-healthcheck")) "timeoutSeconds" 5 -}}
{{- toYaml (mergeOverwrite $exec (deepCopy (.settings | default dict))) -}}
{{- else -}}
{{- toYaml (mergeOverwrite (dict "grpc" (dict "port" (int .port))) (deepCopy (.settings | default dict))) -}}
{{- end -}}
{{- end -}}

{{/* The Secret with a role's certificate (tls.crt, tls.key, ca.crt): (dict "root" $ "role" NAME). */}}
{{- define "crossdraft.tlsSecret" -}}
{{- $t := .root.Values.tls -}}
{{- $own := index $t.secrets .role | default "" -}}
{{- $own | default $t.existingSecret | required (printf "tls.enabled needs tls.existingSecret or tls.secrets.%s: a Secret with tls.crt, tls.key and ca.crt" .role) -}}
{{- end -}}

{{/* TLS arguments of a role (a YAML list): the mounted certificate, key and CA, or --insecure (the pods
listen on 0.0.0.0, where crossdraft refuses plaintext unless asked): (dict "root" $ "role" NAME). */}}
{{- define "crossdraft.tlsArgs" -}}
{{- $t := .root.Values.tls -}}
{{- if $t.enabled -}}
- --tls-cert=/etc/crossdraft/tls/tls.crt
- --tls-key=/etc/crossdraft/tls/tls.key
- --tls-ca=/etc/crossdraft/tls/ca.crt
- --tls-server-name={{ $t.serverName }}
{{- if and (eq .role "gateway") $t.gatewayClientCertificates }}
- --tls-client-ca=/etc/crossdraft/tls/ca.crt
{{- end }}
{{- else -}}
- --insecure
{{- end -}}
{{- end -}}

{{/* The TLS volume mount of a role (a YAML list, empty without TLS): (dict "root" $). */}}
{{- define "crossdraft.tlsVolumeMount" -}}
{{- if .root.Values.tls.enabled -}}
- name: tls
  mountPath: /etc/crossdraft/tls
  readOnly: true
{{- end -}}
{{- end -}}

{{/* The TLS volume of a role (a YAML list, empty without TLS): (dict "root" $ "role" NAME). */}}
{{- define "crossdraft.tlsVolume" -}}
{{- if .root.Values.tls.enabled -}}
- name: tls
  secret:
    secretName: {{ include "crossdraft.tlsSecret" . }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      - {key: ca.crt, path: ca.crt}
{{- end -}}
{{- end -}}

{{/* Resources with GPUs added to the limits: (dict "resources" MAP "gpu" N "name" RESOURCE). */}}
{{- define "crossdraft.resources" -}}
{{- $res := deepCopy (.resources | default dict) -}}
{{- if gt (int (.gpu | default 0)) 0 -}}
{{- $limits := $res.limits | default dict -}}
{{- $_ := set $limits .name (int .gpu) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* `--device` of a model role: the role's own, else cuda with GPUs, else cpu. */}}
{{- define "crossdraft.device" -}}
{{- if .device -}}{{ .device }}{{- else if gt (int (.gpu | default 0)) 0 -}}cuda{{- else -}}cpu{{- end -}}
{{- end -}}

{{/* Environment of a model role (drafter, verifier): HOME and HF_HOME on writable volumes, the Hub token
from its Secret, offline mode. */}}
{{- define "crossdraft.modelEnv" -}}
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /cache/huggingface
- name: PYTHONUNBUFFERED
  value: "1"
{{- with .Values.models.hub.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.models.hub.tokenSecretKey }}
{{- end }}
{{- if .Values.models.hub.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- end -}}

{{- define "crossdraft.modelVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
{{- if .Values.models.pvc.claimName }}
- name: models
  mountPath: {{ .Values.models.pvc.mountPath }}
  readOnly: true
  {{- with .Values.models.pvc.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Volumes of a model pod; the cache volume is left out when a volumeClaimTemplate provides it. */}}
{{- define "crossdraft.modelVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- if not .persistentCache }}
- name: cache
  emptyDir:
    sizeLimit: {{ .root.Values.models.cache.sizeLimit }}
{{- end }}
{{- if .root.Values.models.pvc.claimName }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .root.Values.models.pvc.claimName }}
    readOnly: true
{{- end }}
{{- end -}}

{{/* Pod-level settings every role shares: (dict "root" $ "role" MAP "securityContext" MAP
["serviceAccountName" NAME]: a role's own ServiceAccount, whose token is then mounted). */}}
{{- define "crossdraft.podCommon" -}}
{{- if .serviceAccountName }}
serviceAccountName: {{ .serviceAccountName }}
automountServiceAccountToken: true
{{- else }}
serviceAccountName: {{ include "crossdraft.serviceAccountName" .root }}
automountServiceAccountToken: {{ .root.Values.serviceAccount.automountToken }}
{{- end }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .securityContext | nindent 2 }}
{{- with .role.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Prometheus scrape annotations of a pod that serves metrics. */}}
{{- define "crossdraft.metricsAnnotations" -}}
{{- if and .Values.metrics.enabled .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* An HPA: (dict "root" $ "name" NAME "kind" "Deployment" "autoscaling" MAP "labels" YAML). */}}
{{- define "crossdraft.hpa" -}}
{{- $a := .autoscaling -}}
{{- $metrics := list -}}
{{- if gt (int $a.targetCPUUtilizationPercentage) 0 -}}
{{- $metrics = append $metrics (dict "type" "Resource" "resource" (dict "name" "cpu" "target" (dict "type" "Utilization" "averageUtilization" (int $a.targetCPUUtilizationPercentage)))) -}}
{{- end -}}
{{- $metrics = concat $metrics ($a.metrics | default list) -}}
{{- if not $metrics -}}
{{- fail (printf "%s: autoscaling needs targetCPUUtilizationPercentage > 0 or at least one entry in autoscaling.metrics" .name) -}}
{{- end -}}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ .name }}
  labels:
    {{- .labels | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: {{ .kind }}
    name: {{ .name }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    {{- toYaml $metrics | nindent 4 }}
  {{- with $a.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* A PDB: (dict "name" NAME "pdb" MAP "labels" YAML "selector" YAML). */}}
{{- define "crossdraft.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  labels:
    {{- .labels | nindent 4 }}
spec:
  {{- if not (eq (toString .pdb.minAvailable) "") }}
  minAvailable: {{ .pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ .pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- .selector | nindent 6 }}
{{- end -}}

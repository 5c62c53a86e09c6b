{{/* --allowed-verifiers of the drafters: this release's verifiers and networkPolicy.extraAllowedVerifiers.
The headless Service's name (it also allows the pod addresses it resolves to, for a gateway that dials
verifier pods by IP) and a pattern for the stable DNS name of every pod of the StatefulSet, whatever
verifier.replicas is (drafter_service/allowed.py). */}}
{{- define "crossdraft.allowedVerifiers" -}}
{{- $svc := printf "%s.%s.svc.%s" (include "crossdraft.verifierName" .) .Release.Namespace .Values.clusterDomain -}}
{{- $port := int .Values.verifier.port -}}
{{- $entries := list (printf "%s:%d" $svc $port) (printf "*.%s:%d" $svc $port) -}}
{{- range .Values.networkPolicy.extraAllowedVerifiers -}}
{{- $entries = append $entries . -}}
{{- end -}}
{{- join "," $entries -}}
{{- end -}}

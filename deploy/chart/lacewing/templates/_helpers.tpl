{{- define "lacewing.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "lacewing.labels" -}}
app.kubernetes.io/part-of: lacewing
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{/* The listener limits, as flags of both daemons. */}}
{{- define "lacewing.limitArgs" -}}
- --handshake-timeout={{ .Values.limits.handshakeTimeout }}
- --max-handshakes={{ int .Values.limits.maxHandshakes }}
- --max-handshakes-per-source={{ int .Values.limits.maxHandshakesPerSource }}
- --max-connections-per-source={{ int .Values.limits.maxConnectionsPerSource }}
- --idle-timeout={{ .Values.limits.idleTimeout }}
- --max-header-bytes={{ int .Values.limits.maxHeaderBytes }}
{{- end }}

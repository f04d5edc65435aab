{{/* Names and labels shared by every object of the release. */}}
{{- define "tandem.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tandem.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: tandem.selector (dict "root" $ "component" "router"). */}}
{{- define "tandem.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* host:port of etcd: this release's or the external one. */}}
{{- define "tandem.etcdEndpoint" -}}
{{- if .Values.etcd.enabled -}}
{{ include "tandem.fullname" . }}-etcd:2379
{{- else -}}
{{ required "etcd.externalEndpoint is required when etcd.enabled is false" .Values.etcd.externalEndpoint }}
{{- end -}}
{{- end -}}

{{- define "tandem.authSecret" -}}
{{- default (printf "%s-auth" (include "tandem.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "tandem.tlsSecret" -}}
{{- default (printf "%s-tls" (include "tandem.fullname" .)) .Values.tls.existingSecret -}}
{{- end -}}

{{/* Environment every Tandem process gets: registry, TLS, logging. */}}
{{- define "tandem.commonEnv" -}}
- name: TANDEM_ETCD_ENDPOINT
  value: {{ include "tandem.etcdEndpoint" . | quote }}
- name: TANDEM_CLUSTER
  value: {{ .Values.cluster | quote }}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
- name: TANDEM_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- with .Values.tracing.otlpEndpoint }}
- name: TANDEM_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: TANDEM_TLS_CERT
  value: /etc/tandem/tls/tls.crt
- name: TANDEM_TLS_KEY
  value: /etc/tandem/tls/tls.key
- name: TANDEM_TLS_CA
  value: /etc/tandem/tls/ca.crt
{{- with .Values.tls.serverName }}
- name: TANDEM_TLS_SERVER_NAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "tandem.tlsVolumeMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/tandem/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "tandem.tlsVolume" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "tandem.tlsSecret" . }}
{{- end }}
{{- end -}}

{{/* Probes on the metrics listener's /healthz and /readyz (plain HTTP, also with TLS on):
     tandem.probes (dict "port" "metrics" "startupSeconds" 600). */}}
{{- define "tandem.probes" -}}
startupProbe:
  httpGet: {path: /readyz, port: {{ .port }}}
  periodSeconds: 5
  failureThreshold: {{ div .startupSeconds 5 | max 1 }}
livenessProbe:
  httpGet: {path: /healthz, port: {{ .port }}}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet: {path: /readyz, port: {{ .port }}}
  periodSeconds: 5
  failureThreshold: 2
{{- end -}}

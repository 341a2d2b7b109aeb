{{- define "meshsec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "meshsec.fullname" -}}
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

{{- define "meshsec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "meshsec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshsec
{{- end }}

{{- define "meshsec.selector" -}}
app.kubernetes.io/name: {{ include "meshsec.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "meshsec.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
{{- end }}

{{- define "meshsec.controllerName" -}}
{{ include "meshsec.fullname" . }}-controller
{{- end }}

{{- define "meshsec.agentName" -}}
{{ include "meshsec.fullname" . }}-agent
{{- end }}

{{- define "meshsec.tokenSecret" -}}
{{ .Values.joinToken.existingSecret | default (printf "%s-join-token" (include "meshsec.fullname" .)) }}
{{- end }}

{{- define "meshsec.caSecret" -}}
{{ .Values.controllerCA.existingSecret | default (printf "%s-controller-ca" (include "meshsec.fullname" .)) }}
{{- end }}

{{- define "meshsec.caConfigMap" -}}
{{ include "meshsec.fullname" . }}-controller-ca
{{- end }}

{{- define "meshsec.caFromConfigMap" -}}
{{- if not (or .Values.controllerCA.pem .Values.controllerCA.existingSecret) }}true{{ end }}
{{- end }}

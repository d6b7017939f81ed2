{{/* Chart name, truncated to a DNS label. */}}
{{- define "vexil.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, with the chart name unless the release already has it. */}}
{{- define "vexil.fullname" -}}
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

{{- define "vexil.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/). */}}
{{- define "vexil.labels" -}}
helm.sh/chart: {{ include "vexil.chart" . }}
{{ include "vexil.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vexil
{{- end }}

{{- define "vexil.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vexil.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vexil.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vexil.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vexil.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* "true" when a database is configured: `vexil serve` with the managed store; else flag files only. */}}
{{- define "vexil.hasDatabase" -}}
{{- if .Values.database.existingSecret }}true{{ end }}
{{- end }}

{{/* Seconds Vexil needs to stop: shutdown-delay (not ready) + shutdown-timeout (drain). */}}
{{- define "vexil.shutdownSeconds" -}}
{{- $delay := index .Values.config "shutdown-delay" | default 5 | int }}
{{- $timeout := index .Values.config "shutdown-timeout" | default 20 | int }}
{{- add $delay $timeout }}
{{- end }}

{{- define "vexil.terminationGracePeriodSeconds" -}}
{{- $needed := include "vexil.shutdownSeconds" . | int }}
{{- if .Values.terminationGracePeriodSeconds }}
{{- if le (int .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than config shutdown-delay + shutdown-timeout (%d)" (int .Values.terminationGracePeriodSeconds) $needed) }}
{{- end }}
{{- .Values.terminationGracePeriodSeconds }}
{{- else }}
{{- add $needed 10 }}
{{- end }}
{{- end }}

{{/* Settings that need the managed store (a database). */}}
{{- define "vexil.checkValues" -}}
{{- if not (include "vexil.hasDatabase" .) }}
{{- if .Values.redis.existingSecret }}
{{- fail "redis.existingSecret needs database.existingSecret: Redis connects replicas that share a database" }}
{{- end }}
{{- if .Values.adminToken.existingSecret }}
{{- fail "adminToken.existingSecret needs database.existingSecret: without a database Vexil serves flag files only and has no admin API" }}
{{- end }}
{{- if not .Values.flags }}
{{- fail "nothing to serve: set flags (a flagd JSON document) or database.existingSecret" }}
{{- end }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- end }}

{{/* Pod and container security settings shared by the server and the migration Job. */}}
{{- define "vexil.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}
{{- define "vexil.containerSecurityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/* VEXIL_DATABASE_URL from its Secret. */}}
{{- define "vexil.databaseEnv" -}}
- name: VEXIL_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.secretKey }}
{{- end }}

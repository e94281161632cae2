{{/* The chart's name, or nameOverride. */}}
{{- define "citynerve-hub.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A fully qualified name: release-chart, unless the release name already contains the chart's. */}}
{{- define "citynerve-hub.fullname" -}}
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

{{- define "citynerve-hub.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The standard labels of every object. */}}
{{- define "citynerve-hub.labels" -}}
helm.sh/chart: {{ include "citynerve-hub.chart" . }}
{{ include "citynerve-hub.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: citynerve
{{- end }}

{{- define "citynerve-hub.selectorLabels" -}}
app.kubernetes.io/name: {{ include "citynerve-hub.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "citynerve-hub.operatorSelectorLabels" -}}
{{ include "citynerve-hub.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "citynerve-hub.mlflowSelectorLabels" -}}
{{ include "citynerve-hub.selectorLabels" . }}
app.kubernetes.io/component: mlflow
{{- end }}

{{- define "citynerve-hub.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "citynerve-hub.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "citynerve-hub.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The MLflow tracking URL the federation uses: the in-chart server's, or the external one. */}}
{{- define "citynerve-hub.mlflowUrl" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s-mlflow.%s.svc:%d" (include "citynerve-hub.fullname" .) .Release.Namespace (int .Values.mlflow.port) }}
{{- else }}
{{- .Values.mlflow.externalUrl }}
{{- end }}
{{- end }}

{{/* The Secret holding the MLflow identities' passwords: the given one, or the chart's with its
server; empty when there is none (an external server without mlflow.auth.existingSecret). */}}
{{- define "citynerve-hub.mlflowAuthSecret" -}}
{{- if .Values.mlflow.auth.existingSecret }}
{{- .Values.mlflow.auth.existingSecret }}
{{- else if .Values.mlflow.enabled }}
{{- printf "%s-mlflow-auth" (include "citynerve-hub.fullname" .) }}
{{- end }}
{{- end }}

{{/* The restricted Pod Security Standard, for every pod and container of the chart. */}}
{{- define "citynerve-hub.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "citynerve-hub.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* MLFLOW_SERVER_ALLOWED_HOSTS of the MLflow server (`name`: its Service): the Service's names, with
or without a port; MLflow's own defaults (loopback and private addresses, for clients that use a pod's
address), which setting the variable replaces; and mlflow.allowedHosts. fnmatch patterns, so an IPv6
literal's "[" is escaped as "[[]". */}}
{{- define "citynerve-hub.mlflowAllowedHosts" -}}
{{- $ns := .root.Release.Namespace }}
{{- $hosts := list }}
{{- range $host := list .name (printf "%s.%s" .name $ns) (printf "%s.%s.svc" .name $ns) (printf "%s.%s.svc.cluster.local" .name $ns) "localhost" "127.0.0.1" }}
{{- $hosts = concat $hosts (list $host (printf "%s:*" $host)) }}
{{- end }}
{{- $hosts = concat $hosts (list "[::1]" "[[]::1]:*" "10.*" "192.168.*") }}
{{- range $second := untilStep 16 32 1 }}
{{- $hosts = append $hosts (printf "172.%d.*" $second) }}
{{- end }}
{{- $hosts = concat $hosts (list "fc00:*" "fd00:*") .root.Values.mlflow.allowedHosts }}
{{- join "," $hosts }}
{{- end }}

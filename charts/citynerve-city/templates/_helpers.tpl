{{/* The chart's name, or nameOverride. */}}
{{- define "citynerve-city.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A fully qualified name: release-chart, unless the release name already contains the chart's. */}}
{{- define "citynerve-city.fullname" -}}
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

{{- define "citynerve-city.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The standard labels of every object. */}}
{{- define "citynerve-city.labels" -}}
helm.sh/chart: {{ include "citynerve-city.chart" . }}
{{ include "citynerve-city.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: citynerve
{{- end }}

{{- define "citynerve-city.selectorLabels" -}}
app.kubernetes.io/name: {{ include "citynerve-city.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "citynerve-city.operatorSelectorLabels" -}}
{{ include "citynerve-city.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "citynerve-city.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "citynerve-city.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "citynerve-city.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The restricted Pod Security Standard, for every pod and container of the chart. */}}
{{- define "citynerve-city.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "citynerve-city.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The namespaces the operator watches in namespaced mode. */}}
{{- define "citynerve-city.watchNamespaces" -}}
{{- if .Values.operator.watchNamespaces }}
{{- toJson .Values.operator.watchNamespaces }}
{{- else }}
{{- toJson (list .Release.Namespace) }}
{{- end }}
{{- end }}

{{- define "citynerve-city.bootstrapSecret" -}}
{{- default (printf "%s-hub-bootstrap" (include "citynerve-city.fullname" .)) .Values.hub.bootstrap.existingSecret }}
{{- end }}

{{/* The City this city asks the hub to create: citynerve.operators.federation.embedded.join_request(). */}}
{{- define "citynerve-city.joinRequest" -}}
{{- $c := .Values.city }}
{{- $name := include "citynerve-city.cityName" . }}
{{- $labels := mustMergeOverwrite (dict "region" $c.region) (deepCopy $c.labels) }}
{{- $spec := dict "displayName" (default (title $name) $c.displayName) "region" $c.region "approved" false }}
{{- $_ := set $spec "connection" (dict "heartbeatIntervalSeconds" (int $c.heartbeatSeconds) "heartbeatTimeoutSeconds" (int $c.heartbeatTimeoutSeconds)) }}
{{- $_ := set $spec "dataResidency" (dict "jurisdiction" $c.dataResidency.jurisdiction) }}
{{- toJson (dict "apiVersion" "citynerve.io/v1alpha1" "kind" "City" "metadata" (dict "name" $name "labels" $labels) "spec" $spec) }}
{{- end }}

{{/* The City's name: city.name, or the release name. */}}
{{- define "citynerve-city.cityName" -}}
{{- default .Release.Name .Values.city.name }}
{{- end }}

{{/* Where the agent applies the hub's work: operator.workNamespace, or the release namespace. */}}
{{- define "citynerve-city.workNamespace" -}}
{{- default .Release.Namespace .Values.operator.workNamespace }}
{{- end }}

{{/* Where ingest workers run (each gets their account): ingest.namespaces, else the watched ones. */}}
{{- define "citynerve-city.ingestNamespaces" -}}
{{- if .Values.ingest.namespaces }}
{{- toJson .Values.ingest.namespaces }}
{{- else }}
{{- include "citynerve-city.watchNamespaces" . }}
{{- end }}
{{- end }}

{{/* Names and labels. */}}

{{- define "roomgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name: the release name, with the chart name appended
unless the release name already contains it. Truncated to 63 characters
(DNS label limit).
*/}}
{{- define "roomgate.fullname" -}}
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

{{- define "roomgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "roomgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "roomgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "roomgate.labels" -}}
helm.sh/chart: {{ include "roomgate.chart" . }}
{{ include "roomgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "roomgate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "roomgate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Ports, taken from the listen addresses in `config`, so that the container
ports always match what the gateway binds: "0.0.0.0:8080" -> 8080,
"[::]:8080" -> 8080.
*/}}
{{- define "roomgate.httpPort" -}}
{{- dig "server" "listen" "0.0.0.0:8080" .Values.config | splitList ":" | last }}
{{- end }}

{{- define "roomgate.adminPort" -}}
{{- $listen := dig "admin" "listen" "127.0.0.1:9090" .Values.config }}
{{- if or (hasPrefix "127." $listen) (hasPrefix "localhost" $listen) (hasPrefix "[::1]" $listen) }}
{{- fail (printf "config.admin.listen is %s: the kubelet probes and Prometheus reach the admin port from outside the pod, so it must not be a loopback address (e.g. \"0.0.0.0:9090\")" $listen) }}
{{- end }}
{{- $listen | splitList ":" | last }}
{{- end }}

{{/*
The config tree rendered as TOML. Called with a dict: "table" (a map) and
"prefix" (its dotted path, "" at the top). A table's plain keys come first,
then each sub-map as a [table] (TOML requires that order). Keys are sorted.
*/}}
{{- define "roomgate.toml" -}}
{{- $prefix := .prefix }}
{{- range $key, $value := .table }}
{{- if not (kindIs "map" $value) }}
{{ $key }} = {{ include "roomgate.tomlValue" $value }}
{{- end }}
{{- end }}
{{- range $key, $value := .table }}
{{- if kindIs "map" $value }}
{{- $path := ternary $key (printf "%s.%s" $prefix $key) (eq $prefix "") }}

[{{ $path }}]
{{- include "roomgate.toml" (dict "table" $value "prefix" $path) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
One TOML value. Strings are written as JSON strings, whose escapes TOML
shares. Helm reads numbers from values files as floats (100000 would
print as 1e+05), so whole floats are written as integers.
*/}}
{{- define "roomgate.tomlValue" -}}
{{- if kindIs "string" . }}
{{- toJson . }}
{{- else if kindIs "bool" . }}
{{- . }}
{{- else if kindIs "slice" . }}
{{- $items := list }}
{{- range . }}
{{- $items = append $items (include "roomgate.tomlValue" .) }}
{{- end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else if kindIs "float64" . }}
{{- if eq . (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if kindIs "invalid" . }}
{{- fail "a value under config is null: remove the key to use its default" }}
{{- else if kindIs "map" . }}
{{- fail "a map inside a list under config cannot be rendered as TOML" }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

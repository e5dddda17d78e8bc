{{/* The name of the agent's DaemonSet, ServiceAccount, ClusterRole and PodMonitor. */}}
{{- define "mantlet.agent" -}}
{{- printf "%s-agent" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the agent's pods; they never change on upgrade. */}}
{{- define "mantlet.selectorLabels" -}}
app.kubernetes.io/name: mantlet-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object of the chart. */}}
{{- define "mantlet.labels" -}}
{{ include "mantlet.selectorLabels" . }}
app.kubernetes.io/part-of: mantlet
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The agent's image: repository with the digest, or the tag (the chart's appVersion by default). */}}
{{- define "mantlet.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* The name of the cluster CA's Deployment, Service, ServiceAccount and roles (ca.mode=cluster). */}}
{{- define "mantlet.ca" -}}
{{- printf "%s-ca" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the cluster CA's pods. */}}
{{- define "mantlet.caSelectorLabels" -}}
app.kubernetes.io/name: mantlet-ca
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of the cluster CA's objects. */}}
{{- define "mantlet.caLabels" -}}
{{ include "mantlet.caSelectorLabels" . }}
app.kubernetes.io/component: ca
app.kubernetes.io/part-of: mantlet
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The trust domain of the identities in cluster mode: the value, or identity's default. */}}
{{- define "mantlet.trustDomain" -}}
{{- .Values.trustDomain | default "cluster.local" -}}
{{- end -}}

{{/* The SPIFFE ID of the cluster CA's serving certificate. */}}
{{- define "mantlet.caServerID" -}}
{{- printf "spiffe://%s/ns/%s/sa/%s" (include "mantlet.trustDomain" .) .Release.Namespace (include "mantlet.ca" .) -}}
{{- end -}}

{{/* The federated trust domains, as a JSON list: the keys of federation.bundles, or federation.trustDomains of an existing ConfigMap. */}}
{{- define "mantlet.federatedDomains" -}}
{{- if .Values.federation.existingConfigMap -}}
{{- .Values.federation.trustDomains | default list | toJson -}}
{{- else -}}
{{- keys (.Values.federation.bundles | default dict) | sortAlpha | toJson -}}
{{- end -}}
{{- end -}}

{{/* The ConfigMap of the federated bundles. */}}
{{- define "mantlet.federationConfigMap" -}}
{{- .Values.federation.existingConfigMap | default (printf "%s-federation" .Release.Name | trunc 63 | trimSuffix "-") -}}
{{- end -}}

{{/* Names and labels shared by every template. */}}
{{- define "aao.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "aao.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "aao.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aao.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "aao.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "aao.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "aao.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "aao.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "aao.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Combinations of values the schema cannot judge alone: refused at render time. */}}
{{- define "aao.validate" -}}
{{- if and .Values.podDisruptionBudget.enabled (lt (int .Values.replicaCount) 2) -}}
{{- fail "podDisruptionBudget.enabled needs replicaCount >= 2: with one replica the PDB would block every node drain" -}}
{{- end -}}
{{- if and .Values.podDisruptionBudget.enabled (ge (int .Values.podDisruptionBudget.minAvailable) (int .Values.replicaCount)) -}}
{{- fail "podDisruptionBudget.minAvailable must be below replicaCount, or no replica may ever be evicted" -}}
{{- end -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) -}}
{{- fail "replicaCount > 1 needs leaderElection.enabled: without it every replica would act" -}}
{{- end -}}
{{- if and .Values.leaderElection.enabled (ge (float64 .Values.leaderElection.retryPeriod) (float64 .Values.leaderElection.leaseDuration)) -}}
{{- fail "leaderElection.retryPeriod must be shorter than leaderElection.leaseDuration, or the leader loses its Lease between renewals" -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled .Values.notifications.urls (not .Values.networkPolicy.notificationEgress) -}}
{{- fail "notifications.urls with networkPolicy.enabled needs networkPolicy.notificationEgress: the NetworkPolicy would block every notification" -}}
{{- end -}}
{{- if and .Values.notifications.secretName (not .Values.notifications.urls) -}}
{{- fail "notifications.secretName without notifications.urls signs nothing: set the URLs too" -}}
{{- end -}}
{{- if and .Values.authorizationWebhook.enabled (not .Values.authorizationWebhook.clientCASecret) (not .Values.authorizationWebhook.allowAnyClient) -}}
{{- fail "authorizationWebhook.enabled needs authorizationWebhook.clientCASecret (the CA of the API server's webhook client certificate), or allowAnyClient=true" -}}
{{- end -}}
{{- if and .Values.authorizationWebhook.enabled (eq .Values.authorizationWebhook.certificate.source "secret") (not .Values.authorizationWebhook.certificate.secretName) -}}
{{- fail "authorizationWebhook.certificate.source=secret needs authorizationWebhook.certificate.secretName (a kubernetes.io/tls Secret in the release namespace)" -}}
{{- end -}}
{{- if and .Values.authorizationWebhook.enabled (eq .Values.authorizationWebhook.certificate.source "cert-manager") (not (.Capabilities.APIVersions.Has "cert-manager.io/v1")) -}}
{{- fail "authorizationWebhook.certificate.source=cert-manager, but cert-manager.io/v1 is not served by this cluster" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled needs metrics.service.enabled: the ServiceMonitor scrapes that Service" -}}
{{- end -}}
{{- end -}}

{{/* Where the webhook's serving certificate comes from: chart, cert-manager or secret
("auto": cert-manager when the cluster serves it, else chart). */}}
{{- define "aao.authzCertSource" -}}
{{- $s := .Values.authorizationWebhook.certificate.source -}}
{{- if eq $s "auto" -}}
{{- if .Capabilities.APIVersions.Has "cert-manager.io/v1" }}cert-manager{{ else }}chart{{ end -}}
{{- else -}}
{{- $s -}}
{{- end -}}
{{- end -}}

{{- define "aao.authzSecretName" -}}
{{- if eq .Values.authorizationWebhook.certificate.source "secret" -}}
{{- .Values.authorizationWebhook.certificate.secretName -}}
{{- else -}}
{{- printf "%s-authz-tls" (include "aao.fullname" .) -}}
{{- end -}}
{{- end -}}

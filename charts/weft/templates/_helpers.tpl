{{/* Names and labels shared by every template. */}}

{{- define "weft.labels" -}}
app.kubernetes.io/part-of: weft
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/*
The image of a component: `include "weft.image" (list . "operator")`. Its tag is
`<component>.image.tag`, else `image.tag`, else the chart's appVersion.
*/}}
{{- define "weft.image" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $own := (index $root.Values $component).image | default dict -}}
{{- $tag := $own.tag | default $root.Values.image.tag | default $root.Chart.AppVersion -}}
{{- printf "%s/%s:%s" $root.Values.image.registry $component $tag -}}
{{- end }}

{{- define "weft.webhookName" -}}
weft-sidecar-injector
{{- end }}

{{/* Pod security settings every Weft component runs with. */}}
{{- define "weft.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Name prefix of every object (one release per cluster). */}}
{{- define "extconn.fullname" -}}
{{- default "k8s-ext-connector" .Values.fullnameOverride | trunc 42 | trimSuffix "-" -}}
{{- end -}}

{{- define "extconn.connectorNamespace" -}}
{{- .Values.connectorNamespace.name -}}
{{- end -}}

{{- define "extconn.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}

{{- define "extconn.sidecarImage" -}}
{{- $repository := default .Values.image.repository .Values.sidecar.image.repository -}}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.sidecar.image.tag | toString -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}

{{/*
Selector labels of one component. app.kubernetes.io/name is fixed: the webhook's
objectSelector keeps the connector's own pods out of injection by it.
Call with (dict "root" $ "component" "operator").
*/}}
{{- define "extconn.selectorLabels" -}}
app.kubernetes.io/name: k8s-ext-connector
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "extconn.labels" -}}
{{ include "extconn.selectorLabels" . }}
app.kubernetes.io/part-of: k8s-ext-connector
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/* KEY=VALUE into a one-entry map, as YAML. */}}
{{- define "extconn.labelSelector" -}}
{{- $parts := splitn "=" 2 . -}}
{{ $parts._0 }}: {{ $parts._1 | quote }}
{{- end -}}

{{/* Pod and container security for components that need no privileges at all. */}}
{{- define "extconn.restrictedPodSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "extconn.restrictedContainerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Preferred spreading of a component's replicas over nodes, unless affinity is given. */}}
{{- define "extconn.affinity" -}}
{{- if .values.affinity -}}
{{ toYaml .values.affinity }}
{{- else -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "extconn.selectorLabels" (dict "root" .root "component" .component) | nindent 12 }}
{{- end -}}
{{- end -}}

{{- define "extconn.podEnv" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
{{- end -}}

{{- define "extconn.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{- define "extconn.tlsSecret" -}}
{{- printf "%s-webhook-tls" (include "extconn.fullname" .) -}}
{{- end -}}

{{/* The webhook CA's key: read and written by the certs component only. */}}
{{- define "extconn.caSecret" -}}
{{- printf "%s-webhook-ca" (include "extconn.fullname" .) -}}
{{- end -}}

{{/*
A component's ServiceAccount, ClusterRole and Role with their bindings, rendered from
files/rbac-rules.yaml, which `k8s-ext-connector rbac rules` writes from operator/rbac.py
(the one list of what each component calls; tests keep the three equal).
Call with (dict "root" $ "component" "operator").
*/}}
{{- define "extconn.rbac" -}}
{{- $root := .root -}}
{{- $component := .component -}}
{{- $spec := index ($root.Files.Get "files/rbac-rules.yaml" | fromYaml) $component -}}
{{- $name := printf "%s-%s" (include "extconn.fullname" $root) $component -}}
{{- $saNamespace := ternary (include "extconn.connectorNamespace" $root) $root.Release.Namespace (eq $component "gateway") -}}
{{- $roleNamespace := ternary (include "extconn.connectorNamespace" $root) $root.Release.Namespace (eq $spec.roleNamespace "connector") -}}
{{- $labels := include "extconn.labels" (dict "root" $root "component" $component) -}}
{{- /* The objects name-restricted rules cover (operator/rbac.py OBJECT_NAMES). */ -}}
{{- $names := dict
  "operator-lease" "k8s-ext-connector-operator"
  "webhook-configuration" (include "extconn.fullname" $root)
  "webhook-tls-secret" (include "extconn.tlsSecret" $root)
  "webhook-ca-secret" (include "extconn.caSecret" $root) -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ $name }}
  namespace: {{ $saNamespace }}
  labels:
    {{- $labels | nindent 4 }}
automountServiceAccountToken: true
{{- /* (kind, rules, name, namespace): the ClusterRole, the Role, and a second Role in the
connector namespace (connectorRules, operator/rbac.py CONNECTOR_ROLE_SUFFIX). */ -}}
{{- $roles := list
  (list "Cluster" $spec.clusterRules $name "")
  (list "" $spec.namespaceRules $name $roleNamespace)
  (list "" $spec.connectorRules (printf "%s-connector" $name) (include "extconn.connectorNamespace" $root)) -}}
{{- range $role := $roles }}
{{- $kind := index $role 0 }}
{{- $rules := index $role 1 }}
{{- $roleName := index $role 2 }}
{{- $ns := index $role 3 }}
{{- if $rules }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ $kind }}Role
metadata:
  name: {{ $roleName }}
  {{- if not $kind }}
  namespace: {{ $ns }}
  {{- end }}
  labels:
    {{- $labels | nindent 4 }}
rules:
  {{- range $rules }}
  # {{ .why }}
  - apiGroups: {{ toJson .apiGroups }}
    resources: {{ toJson .resources }}
    {{- with .resourceNames }}
    resourceNames:
      {{- range . }}
      - {{ index $names . | required (printf "no name for %s" .) }}
      {{- end }}
    {{- end }}
    verbs: {{ toJson .verbs }}
  {{- end }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ $kind }}RoleBinding
metadata:
  name: {{ $roleName }}
  {{- if not $kind }}
  namespace: {{ $ns }}
  {{- end }}
  labels:
    {{- $labels | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: {{ $kind }}Role
  name: {{ $roleName }}
subjects:
  - kind: ServiceAccount
    name: {{ $name }}
    namespace: {{ $saNamespace }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
A PodDisruptionBudget keeping one replica of a component through voluntary disruptions,
when the component has more than one. Call with (dict "root" $ "component" "webhook").
*/}}
{{- define "extconn.pdb" -}}
{{- $values := index .root.Values .component -}}
{{- if and $values.podDisruptionBudget.enabled (gt (int $values.replicas) 1) }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "extconn.fullname" .root }}-{{ .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "extconn.labels" . | nindent 4 }}
spec:
  minAvailable: 1
  selector:
    matchLabels:
      {{- include "extconn.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end -}}

{{/* ---- names and labels ------------------------------------------------------------------------- */}}

{{- define "v4ray.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name; kept short because KubeRay derives pod and service names from it. */}}
{{- define "v4ray.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "v4ray.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "v4ray.selectorLabels" -}}
app.kubernetes.io/name: {{ include "v4ray.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "v4ray.labels" -}}
helm.sh/chart: {{ include "v4ray.chart" . }}
{{ include "v4ray.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* ---- checks that the schema cannot express ----------------------------------------------------- */}}

{{- define "v4ray.validate" -}}
{{- $a := .Values.serve.args }}
{{- $r := .Values.workers.routers }}
{{- $s := .Values.workers.expertShards }}
{{- $model := required "serve.args.model is required: a checkpoint directory below model.mountPath, or a tiny preset name" $a.model }}
{{- if and (gt (int $a.num_routers) 1) (eq (int $a.num_expert_shards) 0) }}
{{- fail (printf "serve.args.num_routers is %d but num_expert_shards is 0: more than one router needs expert shards (as ServeConfig requires)" (int $a.num_routers)) }}
{{- end }}
{{- if gt (int $r.gpusPerPod) 0 }}
{{- if ne (mul (int $r.replicas) (int $r.gpusPerPod)) (int $a.num_routers) }}
{{- fail (printf "workers.routers gives %d GPUs (replicas %d x gpusPerPod %d) but serve.args.num_routers is %d: one router per GPU; regenerate both with `v4ray plan layout --emit-values`" (mul (int $r.replicas) (int $r.gpusPerPod)) (int $r.replicas) (int $r.gpusPerPod) (int $a.num_routers)) }}
{{- end }}
{{- end }}
{{- if gt (int $s.gpusPerPod) 0 }}
{{- if ne (mul (int $s.replicas) (int $s.gpusPerPod)) (int $a.num_expert_shards) }}
{{- fail (printf "workers.expertShards gives %d GPUs (replicas %d x gpusPerPod %d) but serve.args.num_expert_shards is %d: one shard per GPU; regenerate both with `v4ray plan layout --emit-values`" (mul (int $s.replicas) (int $s.gpusPerPod)) (int $s.replicas) (int $s.gpusPerPod) (int $a.num_expert_shards)) }}
{{- end }}
{{- end }}
{{- if and (hasPrefix "/" $model) .Values.model.claimName (not (hasPrefix .Values.model.mountPath $model)) }}
{{- fail (printf "serve.args.model %q is not below model.mountPath %q where the model claim %q is mounted" $model .Values.model.mountPath .Values.model.claimName) }}
{{- end }}
{{- if and (hasPrefix "/" $model) (not .Values.model.claimName) }}
{{- fail (printf "serve.args.model %q is a path but model.claimName is empty: set the PVC that holds the checkpoint" $model) }}
{{- end }}
{{- if $a.api_key_file }}
{{- fail "serve.args.api_key_file is not used by the chart: put the key in a Secret and set apiKey.existingSecret (env V4RAY_API_KEY)" }}
{{- end }}
{{- if not (or .Values.apiKey.existingSecret .Values.apiKey.disabled) }}
{{- fail "apiKey.existingSecret is empty: the OpenAI routes would serve without authentication. Name a Secret holding the API key (kubectl create secret generic v4ray-api-key --from-literal=api-key=...), or set apiKey.disabled=true to serve without one" }}
{{- end }}
{{- if and (eq .Values.rayAuth.mode "token") (not .Values.rayAuth.secretName) }}
{{- fail "rayAuth.secretName is required when rayAuth.mode is token: name a Secret holding the Ray auth token (key auth_token)" }}
{{- end }}
{{- end }}

{{/* One word of a POSIX shell command: as is when it holds only safe characters, else in single quotes with
each embedded ' written as '\'' (close, escaped quote, reopen). */}}
{{- define "v4ray.shellWord" -}}
{{- if regexMatch "^[A-Za-z0-9_./:=,+@%-]+$" . }}{{ . }}{{ else }}'{{ replace "'" "'\\''" . }}'{{ end }}
{{- end }}

{{/* ---- the Serve config (serveConfigV2): ray_config.yaml's schema, HTTP on 0.0.0.0 ------------------ */}}

{{- define "v4ray.serveConfig" -}}
proxy_location: {{ .Values.serve.proxyLocation }}
http_options:
  host: 0.0.0.0
  port: {{ .Values.serve.port }}
applications:
  - name: {{ .Values.serve.name | quote }}
    route_prefix: {{ .Values.serve.routePrefix | quote }}
    import_path: v4ray.serve.app:build_app
    args:
      {{- toYaml .Values.serve.args | nindent 6 }}
{{- end }}

{{/* ---- shared pod-spec partials ------------------------------------------------------------------ */}}

{{/* Pod-level security: non-root, RuntimeDefault seccomp. */}}
{{- define "v4ray.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.security.runAsUser }}
runAsGroup: {{ .Values.security.runAsGroup }}
fsGroup: {{ .Values.security.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "v4ray.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* Environment of every Ray container: writable caches under /tmp/ray, the API key from its Secret. */}}
{{- define "v4ray.env" -}}
- name: HOME
  value: /tmp/ray/home
- name: V4RAY_CACHE_DIR
  value: /tmp/ray/v4ray-cache
- name: TRITON_CACHE_DIR
  value: /tmp/ray/triton
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- if and .Values.apiKey.existingSecret (not .Values.apiKey.disabled) }}
- name: V4RAY_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKey.existingSecret | quote }}
      key: {{ .Values.apiKey.secretKey | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes: args (dict "root" $ "data" <batchJob.data or nil>). */}}
{{- define "v4ray.volumes" -}}
{{- $v := .root.Values -}}
- name: ray-tmp
  emptyDir:
    sizeLimit: {{ $v.security.tmpSizeLimit }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $v.security.shmSizeLimit }}
{{- if $v.model.claimName }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $v.model.claimName | quote }}
    readOnly: true
{{- end }}
{{- if .data }}
- name: data
  persistentVolumeClaim:
    claimName: {{ .data.claimName | quote }}
{{- end }}
{{- end }}

{{- define "v4ray.volumeMounts" -}}
{{- $v := .root.Values -}}
- name: ray-tmp
  mountPath: /tmp/ray
- name: dshm
  mountPath: /dev/shm
{{- if $v.model.claimName }}
- name: model
  mountPath: {{ $v.model.mountPath | quote }}
  {{- with $v.model.subPath }}
  subPath: {{ . | quote }}
  {{- end }}
  readOnly: true
{{- end }}
{{- if .data }}
- name: data
  mountPath: {{ .data.mountPath | quote }}
{{- end }}
{{- end }}

{{/*
A Ray pod template (metadata + spec), shared by the head group and both worker groups of the RayService
and the RayJob. Args: dict "root" $, "component" (head | router | expert-shard | submitter), "pool" (head or
a workers entry), "gpus" (int), "ports" (bool: the head's ports), "data" (batchJob.data or nil),
"command" (list, submitter only).
*/}}
{{- define "v4ray.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $pool := .pool -}}
metadata:
  labels:
    {{- include "v4ray.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  automountServiceAccountToken: false
  securityContext:
    {{- include "v4ray.podSecurityContext" $root | nindent 4 }}
  {{- if eq .component "submitter" }}
  restartPolicy: Never
  {{- end }}
  containers:
    - name: {{ eq .component "submitter" | ternary "submitter" "ray" }}
      image: {{ printf "%s:%s" $v.image.repository $v.image.tag | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- with .command }}
      command:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "v4ray.containerSecurityContext" $root | nindent 8 }}
      env:
        {{- include "v4ray.env" $root | nindent 8 }}
      {{- if .ports }}
      ports:
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        - {name: serve, containerPort: {{ $v.serve.port }}}
        - {name: metrics, containerPort: {{ $v.serviceMonitor.port }}}
      {{- else if ne .component "submitter" }}
      ports:
        - {name: metrics, containerPort: {{ $v.serviceMonitor.port }}}
      {{- end }}
      {{- if ne .component "submitter" }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
      {{- end }}
      resources:
        {{- $res := deepCopy ($pool.resources | default dict) }}
        {{- if gt (int .gpus) 0 }}
        {{- $limits := merge (dict "nvidia.com/gpu" (int .gpus)) ($res.limits | default dict) }}
        {{- $_ := set $res "limits" $limits }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      volumeMounts:
        {{- include "v4ray.volumeMounts" . | nindent 8 }}
  volumes:
    {{- include "v4ray.volumes" . | nindent 4 }}
  {{- with $pool.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $pool.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $pool.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* A worker group. Args: dict "root" $ "name" "pool" "component" "data". */}}
{{- define "v4ray.workerGroup" -}}
{{- $gpus := int .pool.gpusPerPod -}}
- groupName: {{ .name }}
  replicas: {{ .pool.replicas }}
  minReplicas: {{ .pool.replicas }}
  maxReplicas: {{ .pool.replicas }}
  rayStartParams:
    {{- $params := merge (dict) (.pool.rayStartParams | default dict) (dict "num-gpus" (toString $gpus)) }}
    {{- toYaml $params | nindent 4 }}
  template:
    {{- include "v4ray.podTemplate" (dict "root" .root "component" .component "pool" .pool "gpus" $gpus "ports" false "data" .data) | nindent 4 }}
{{- end }}

{{/* The RayCluster spec shared by the RayService and the RayJob. Args: dict "root" $ "data" <or nil>. */}}
{{- define "v4ray.rayClusterSpec" -}}
{{- $v := .root.Values -}}
rayVersion: {{ $v.rayVersion | quote }}
enableInTreeAutoscaling: false
{{- if eq $v.rayAuth.mode "token" }}
authOptions:
  mode: token
  secretName: {{ $v.rayAuth.secretName | quote }}
{{- end }}
headGroupSpec:
  rayStartParams:
    {{- toYaml (merge (dict) ($v.head.rayStartParams | default dict) (dict "dashboard-host" "0.0.0.0" "num-gpus" "0")) | nindent 4 }}
  template:
    {{- include "v4ray.podTemplate" (dict "root" .root "component" "head" "pool" $v.head "gpus" 0 "ports" true "data" .data) | nindent 4 }}
workerGroupSpecs:
  {{- include "v4ray.workerGroup" (dict "root" .root "name" "routers" "component" "router" "pool" $v.workers.routers "data" .data) | nindent 2 }}
  {{- if gt (int $v.serve.args.num_expert_shards) 0 }}
  {{- include "v4ray.workerGroup" (dict "root" .root "name" "expert-shards" "component" "expert-shard" "pool" $v.workers.expertShards "data" .data) | nindent 2 }}
  {{- end }}
{{- end }}

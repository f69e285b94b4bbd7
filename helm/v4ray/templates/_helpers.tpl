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
{{- $R := int (default 1 $a.num_routers) }}
{{- $S := int (default 0 $a.num_expert_shards) }}
{{- if and (eq (default "auto" $a.device) "cpu") (or (gt (float64 (default 0 $a.gpus_per_router)) 0.0) (and (gt $S 0) (gt (float64 (default 0 $a.gpus_per_shard)) 0.0))) }}
{{- fail "serve.args.device is cpu but serve.args.gpus_per_router / gpus_per_shard reserve GPUs: the pods would hold GPUs the engine never uses. Set device to auto or cuda, or the GPUs to 0" }}
{{- end }}
{{- if and (gt $S 0) (eq (int $s.replicas) 0) }}
{{- if ne (int $r.replicas) 1 }}
{{- fail (printf "workers.expertShards.replicas is 0 (the expert shards share the router pod) but workers.routers.replicas is %d: a replica in one pod needs workers.routers.replicas 1; give the shards pods of their own otherwise" (int $r.replicas)) }}
{{- end }}
{{- else }}
{{- if ne (mod $R (int $r.replicas)) 0 }}
{{- fail (printf "serve.args.num_routers is %d but workers.routers.replicas is %d: each router pod holds the same number of routers; regenerate both with `v4ray plan layout --emit-values`" $R (int $r.replicas)) }}
{{- end }}
{{- if and (gt $S 0) (ne (mod $S (int $s.replicas)) 0) }}
{{- fail (printf "serve.args.num_expert_shards is %d but workers.expertShards.replicas is %d: each expert-shard pod holds the same number of shards; regenerate both with `v4ray plan layout --emit-values`" $S (int $s.replicas)) }}
{{- end }}
{{- end }}
{{- $_ := include "v4ray.podGpus" (dict "root" . "group" "routers") }}
{{- if and (gt $S 0) (gt (int $s.replicas) 0) }}
{{- $_ := include "v4ray.podGpus" (dict "root" . "group" "expertShards") }}
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

{{/* GPUs of one pod of a worker group, sized from serve.args (the one value that also sizes every rank's
placement bundle): ranks per pod x gpus_per_router / gpus_per_shard. With workers.expertShards.replicas 0 the
router pod holds the expert shards too (a replica that fits one node: Ray places it PACK). Args: dict "root" $
"group" (routers | expertShards). Prints an integer; fails when a pod would need a fraction of a GPU. */}}
{{- define "v4ray.podGpus" -}}
{{- $a := .root.Values.serve.args }}
{{- $w := .root.Values.workers }}
{{- $S := int (default 0 $a.num_expert_shards) }}
{{- $routerGpus := mulf (int (default 1 $a.num_routers)) (float64 (default 0 $a.gpus_per_router)) }}
{{- $shardGpus := mulf $S (float64 (default 0 $a.gpus_per_shard)) }}
{{- $total := $shardGpus }}
{{- if eq .group "routers" }}
{{- $total = $routerGpus }}
{{- if and (gt $S 0) (eq (int $w.expertShards.replicas) 0) }}
{{- $total = addf $routerGpus $shardGpus }}
{{- end }}
{{- end }}
{{- $pods := int (index $w .group).replicas }}
{{- $per := divf $total $pods }}
{{- if ne (floor $per) $per }}
{{- fail (printf "workers.%s: %g GPUs over %d pod(s) is %g per pod, not a whole number (serve.args.gpus_per_router %v, gpus_per_shard %v); change the pods or the GPUs per rank" .group $total $pods $per (default 0 $a.gpus_per_router) (default 0 $a.gpus_per_shard)) }}
{{- end }}
{{- int $per }}
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
        {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) ($res.limits | default dict)) }}
        {{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" (int .gpus)) ($res.requests | default dict)) }}
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

{{/* The most model replicas (V4Server) the application may run: serve.args.num_replicas, or with
serve.args.autoscaling_config its max_replicas (ServeConfig.max_replicas). Prints an integer. */}}
{{- define "v4ray.modelReplicas" -}}
{{- $a := .Values.serve.args }}
{{- if $a.autoscaling_config }}
{{- int (default 1 $a.autoscaling_config.max_replicas) }}
{{- else }}
{{- int (default 1 $a.num_replicas) }}
{{- end }}
{{- end }}

{{/* A worker group. Args: dict "root" $ "name" "group" (routers | expertShards) "component" "data". Its pods'
GPUs (nvidia.com/gpu and Ray's num-gpus alike) come from v4ray.podGpus. workers.<group>.replicas are the pods of
one model replica; the group holds them for every replica that may run (v4ray.modelReplicas): pods are not
autoscaled (no in-tree autoscaler: the pods never call the Kubernetes API), Serve scales replicas inside them. */}}
{{- define "v4ray.workerGroup" -}}
{{- $gpus := include "v4ray.podGpus" (dict "root" .root "group" .group) | int -}}
{{- $pool := index .root.Values.workers .group -}}
{{- $pods := mul (int $pool.replicas) (include "v4ray.modelReplicas" .root | int) -}}
- groupName: {{ .name }}
  replicas: {{ $pods }}
  minReplicas: {{ $pods }}
  maxReplicas: {{ $pods }}
  rayStartParams:
    {{- $params := merge (dict) ($pool.rayStartParams | default dict) (dict "num-gpus" (toString $gpus)) }}
    {{- toYaml $params | nindent 4 }}
  template:
    {{- include "v4ray.podTemplate" (dict "root" .root "component" .component "pool" $pool "gpus" $gpus "ports" false "data" .data) | nindent 4 }}
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
  {{- include "v4ray.workerGroup" (dict "root" .root "name" "routers" "component" "router" "group" "routers" "data" .data) | nindent 2 }}
  {{- if and (gt (int $v.serve.args.num_expert_shards) 0) (gt (int $v.workers.expertShards.replicas) 0) }}
  {{- include "v4ray.workerGroup" (dict "root" .root "name" "expert-shards" "component" "expert-shard" "group" "expertShards" "data" .data) | nindent 2 }}
  {{- end }}
{{- end }}

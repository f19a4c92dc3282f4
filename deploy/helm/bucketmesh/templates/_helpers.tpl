{{/* Names and labels, as in Bitnami's and the Prometheus community charts. */}}

{{- define "bucketmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "bucketmesh.fullname" -}}
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

{{- define "bucketmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bucketmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "bucketmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "bucketmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: bucketmesh
bucketmesh.io/region: {{ include "bucketmesh.region" . }}
{{- end -}}

{{- define "bucketmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "bucketmesh.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "bucketmesh.secretName" -}}
{{- default (include "bucketmesh.fullname" .) .Values.secret.existingSecret -}}
{{- end -}}

{{- define "bucketmesh.image" -}}
{{- /* --set image.tag=42 (or a date tag) parses as a number: a whole one is its digits */ -}}
{{- $raw := default .Chart.AppVersion .Values.image.tag -}}
{{- $tag := toString $raw -}}
{{- if and (kindIs "float64" $raw) (eq $raw (float64 (int64 $raw))) -}}
{{- $tag = toString (int64 $raw) -}}
{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The region, checked: the binary would refuse anything else, later and less clearly. */}}
{{- define "bucketmesh.region" -}}
{{- $region := required "region is required: the region this release serves (e.g. --set region=us-east-1)" .Values.region -}}
{{- if not (regexMatch "^[A-Za-z0-9._-]{1,63}$" $region) -}}
{{- fail (printf "region %q: use 1-63 letters, digits, '.', '_' or '-'" $region) -}}
{{- end -}}
{{- $region -}}
{{- end -}}

{{/* sync.peers as a list: a YAML list, or one comma-separated string
     (`--set 'sync.peers=a\,b'` quoted for the shell, or a values file that says `peers: "a,b"`). */}}
{{- define "bucketmesh.peers" -}}
{{- $peers := .Values.sync.peers -}}
{{- if kindIs "string" $peers -}}
{{- $peers = splitList "," $peers -}}
{{- end -}}
{{- $clean := list -}}
{{- range $peers -}}
{{- $peer := trim (toString .) -}}
{{- if $peer -}}
{{- $clean = append $clean $peer -}}
{{- end -}}
{{- end -}}
{{- toJson $clean -}}
{{- end -}}

{{/* Fails unless the values make a config the binary accepts (with a message
     naming the value to set). */}}
{{- define "bucketmesh.validate" -}}
{{- $region := include "bucketmesh.region" . -}}
{{- if not (has .Values.storage.backend (list "memory" "redis")) -}}
{{- fail (printf "storage.backend %q: use memory or redis" .Values.storage.backend) -}}
{{- end -}}
{{- if and (eq .Values.storage.backend "memory") (gt (int .Values.replicaCount) 1) (not .Values.sync.enabled) -}}
{{- fail (printf "replicaCount %d on storage.backend=memory needs sync.enabled: each pod is its own replica of the mesh, slot <region>.<pod> (docs/scale.md); or use storage.backend=redis, or replicaCount=1" (int .Values.replicaCount)) -}}
{{- end -}}
{{- range (include "bucketmesh.slots" . | fromJsonArray) -}}
{{- if gt (len .) 63 -}}
{{- fail (printf "the pod slot %q is longer than 63 characters: shorten region or fullnameOverride" .) -}}
{{- end -}}
{{- end -}}
{{- if lt (int .Values.replicaCount) 1 -}}
{{- fail "replicaCount must be at least 1" -}}
{{- end -}}
{{- if and (eq .Values.storage.backend "redis") (not .Values.storage.redisUrl) (not .Values.secret.existingSecret) -}}
{{- fail "storage.backend=redis needs storage.redisUrl (or secret.existingSecret holding it under secret.redisUrlKey)" -}}
{{- end -}}
{{- if and .Values.storage.redisUrl .Values.secret.existingSecret -}}
{{- fail (printf "storage.redisUrl is not used with secret.existingSecret (no Secret is rendered to hold it): put the URL in the existing Secret %q under the key %q (Terraform: its redis_url variable) and leave storage.redisUrl empty" .Values.secret.existingSecret .Values.secret.redisUrlKey) -}}
{{- end -}}
{{- if .Values.sync.enabled -}}
{{- $reserved := int (include "bucketmesh.syncPort" .) -}}
{{- if and $reserved (eq $reserved (int .Values.containerPorts.http)) -}}
{{- fail (printf "containerPorts.sync %d is containerPorts.http: the reserved listener needs a port of its own (0: none)" $reserved) -}}
{{- end -}}
{{- if and $reserved .Values.envoy.enabled (eq $reserved (int .Values.envoy.port)) -}}
{{- fail (printf "containerPorts.sync %d is envoy.port: the reserved listener needs a port of its own (0: none)" $reserved) -}}
{{- end -}}
{{- if not .Values.sync.syncClusterId -}}
{{- fail "sync.syncClusterId must not be empty: every region of the mesh uses the same one" -}}
{{- end -}}
{{- if and (not .Values.secret.syncSecret) (not .Values.secret.existingSecret) -}}
{{- fail "sync.enabled needs a sync secret, the same in every region: set secret.syncSecret, or secret.existingSecret holding it under secret.syncSecretKey" -}}
{{- end -}}
{{- $peers := include "bucketmesh.peers" . | fromJsonArray -}}
{{- $discovers := and (eq .Values.storage.backend "memory") (gt (int .Values.replicaCount) 1) .Values.sync.discovery.enabled -}}
{{- if and (not $peers) (not $discovers) -}}
{{- fail "sync.enabled needs sync.peers: the regions of the mesh (e.g. --set 'sync.peers={us-east-1,us-west-2,eu-central-1}')" -}}
{{- end -}}
{{- range $peers -}}
{{- if not (regexMatch "^[A-Za-z0-9._-]{1,63}$" .) -}}
{{- fail (printf "sync.peers: %q is not a region name (1-63 letters, digits, '.', '_' or '-')" .) -}}
{{- end -}}
{{- if and (ne . $region) (not (hasKey $.Values.sync.peerUrls .)) (not $.Values.sync.peerUrlTemplate) -}}
{{- fail (printf "sync.peers lists %q but neither sync.peerUrls nor sync.peerUrlTemplate says how to reach it" .) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.sync.peerUrlTemplate (not (contains "{region}" .Values.sync.peerUrlTemplate)) -}}
{{- fail (printf "sync.peerUrlTemplate %q must contain {region}" .Values.sync.peerUrlTemplate) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Several pods of one region on the memory backend: each pod is its own replica
     of the mesh, a slot named <region>.<pod name> (as an embedded member's,
     docs/scale.md). The slots of this release's pods, as a JSON list (empty with
     one pod, which keeps the region's own name). */}}
{{- define "bucketmesh.slots" -}}
{{- $slots := list -}}
{{- if and (eq .Values.storage.backend "memory") (gt (int .Values.replicaCount) 1) -}}
{{- $region := .Values.region -}}
{{- $fullname := include "bucketmesh.fullname" . -}}
{{- range $i := until (int .Values.replicaCount) -}}
{{- $slots = append $slots (printf "%s.%s-%d" $region $fullname $i) -}}
{{- end -}}
{{- end -}}
{{- toJson $slots -}}
{{- end -}}

{{- define "bucketmesh.configDir" -}}/etc/bucketmesh{{- end -}}
{{- define "bucketmesh.stateDir" -}}/var/lib/bucketmesh{{- end -}}

{{/*
The reserved listener's port (adminListen) with sync.enabled, else 0: the sync
Service's target.
*/}}
{{- define "bucketmesh.syncPort" -}}
{{- if and .Values.sync.enabled .Values.containerPorts.sync -}}
{{- int .Values.containerPorts.sync -}}
{{- else -}}
0
{{- end -}}
{{- end -}}

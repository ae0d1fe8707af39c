{{/* Names and labels. */}}
{{- define "strata.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "strata.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "strata.selectorLabels" -}}
app.kubernetes.io/name: {{ include "strata.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "strata.labels" -}}
{{ include "strata.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: kv-cache
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "strata.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/*
A stratad size ("16GiB", "500GB", "2_048MiB", 4096) as a number of bytes, with
the units stratad accepts (daemon/src/config.rs, ByteSize). Anything else
fails the render, naming the value.
*/}}
{{- define "strata.bytes" -}}
{{- $v := . -}}
{{- if or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) -}}
{{- int64 $v -}}
{{- else -}}
{{- $s := toString $v | trim | replace "_" "" -}}
{{- if not (regexMatch "^[0-9]+ *(B|KiB|K|k|MiB|M|GiB|G|TiB|T|KB|kB|MB|GB|TB)?$" $s) -}}
{{- fail (printf "%q is not a stratad size: write e.g. \"512MiB\", \"16GiB\", \"500GB\" or a number of bytes" $s) -}}
{{- end -}}
{{- $n := regexFind "^[0-9]+" $s | int64 -}}
{{- $unit := regexReplaceAll "^[0-9]+ *" $s "" -}}
{{- $mult := dict "" 1 "B" 1 "KiB" 1024 "K" 1024 "k" 1024 "MiB" 1048576 "M" 1048576 "GiB" 1073741824 "G" 1073741824 "TiB" 1099511627776 "T" 1099511627776 "KB" 1000 "kB" 1000 "MB" 1000000 "GB" 1000000000 "TB" 1000000000000 -}}
{{- mul $n (get $mult $unit) -}}
{{- end -}}
{{- end -}}

{{/*
The daemon's config as a dict: what the chart sets (paths, listeners, tier
sizes) with .Values.config merged over it.
*/}}
{{- define "strata.configDict" -}}
{{- $chart := dict
  "data_dir" .Values.host.dataDir
  "server" (dict
    "uds" (printf "%s/stratad.sock" .Values.host.socketDir)
    "metrics_listen" (printf "0.0.0.0:%d" (int .Values.ports.metrics)))
  "tiers" (dict
    "dram" (dict "bytes" (toString .Values.tiers.dram))
    "nvme" (dict "bytes" (toString .Values.tiers.nvme)))
-}}
{{- toYaml (mergeOverwrite $chart (deepCopy (.Values.config | default dict))) -}}
{{- end -}}

{{/*
A dict as TOML: its scalar and array keys, then one [table] per map value,
recursively; keys in sorted order. Scalars are written as JSON, which is
also valid TOML for strings (\uXXXX escapes), numbers, booleans and arrays
of them.
*/}}
{{- define "strata.toml" -}}
{{- $table := .table -}}
{{- $path := .path -}}
{{- $scalars := list -}}
{{- range $k, $v := $table -}}
{{- if not (kindIs "map" $v) -}}{{- $scalars = append $scalars $k -}}{{- end -}}
{{- end -}}
{{- if and $path $scalars }}
[{{ $path }}]
{{- end -}}
{{- range $k := $scalars -}}
{{- $v := get $table $k -}}
{{- if kindIs "float64" $v -}}
{{- if eq $v (float64 (int64 $v)) }}
{{ $k }} = {{ int64 $v }}
{{- else }}
{{ $k }} = {{ toJson $v }}
{{- end -}}
{{- else if not (kindIs "invalid" $v) }}
{{ $k }} = {{ toJson $v }}
{{- end -}}
{{- end -}}
{{- range $k, $v := $table -}}
{{- if kindIs "map" $v -}}
{{- if $path }}
{{ include "strata.toml" (dict "table" $v "path" (printf "%s.%s" $path $k)) }}
{{- else }}
{{ include "strata.toml" (dict "table" $v "path" $k) }}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Memory request and limit in MiB, from the config (values.yaml, resources,
says which terms and why). Every term is a bound the daemon enforces.
*/}}
{{- define "strata.memoryMiB" -}}
{{- $c := include "strata.configDict" . | fromYaml -}}
{{- $dram := include "strata.bytes" $c.tiers.dram.bytes | int64 -}}
{{- $nvme := include "strata.bytes" $c.tiers.nvme.bytes | int64 -}}
{{- $abstracts := 0 -}}
{{- if $c.compute.abstracts -}}
{{- $abstracts = include "strata.bytes" $c.compute.abstracts_bytes | int64 -}}
{{- if eq $abstracts 0 -}}
{{- $abstracts = max (div (add $dram $nvme) 16) 1048576 -}}
{{- end -}}
{{- end -}}
{{- $index := mul (int64 $c.store.max_blocks) 128 -}}
{{- $events := mul (int64 $c.store.event_buffer) 96 -}}
{{- $io := 0 -}}
{{- if gt $nvme 0 -}}
{{- $io = mul (int64 $c.tiers.nvme.io_buffers) (include "strata.bytes" $c.tiers.nvme.io_buffer_bytes | int64) -}}
{{- end -}}
{{- $puts := include "strata.bytes" $c.server.max_inflight_put_bytes | int64 -}}
{{- $overhead := include "strata.bytes" .Values.resources.memoryOverhead | int64 -}}
{{- $total := add $dram $abstracts $index $events $io $puts $overhead -}}
{{- div (add $total 1048575) 1048576 -}}
{{- end -}}

{{- define "strata.memory" -}}
{{- .Values.resources.memory | default (printf "%sMi" (include "strata.memoryMiB" .)) -}}
{{- end -}}

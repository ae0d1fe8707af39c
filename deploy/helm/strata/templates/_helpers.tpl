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
A dict as TOML: its scalar and array keys under a [table] header, then one
table per map value, recursively; keys in sorted order. Strings, booleans
and numbers are written as JSON, which TOML reads the same (strings with
\uXXXX escapes); whole floats (YAML gives every number as a float) as
integers; arrays as TOML arrays, maps inside them as inline tables.
*/}}
{{- define "strata.toml" -}}
{{- $out := list -}}
{{- $lines := list -}}
{{- range $k, $v := .table -}}
{{- if and (not (kindIs "map" $v)) (not (kindIs "invalid" $v)) -}}
{{- $lines = append $lines (printf "%s = %s" (include "strata.tomlKey" $k) (include "strata.tomlValue" $v)) -}}
{{- end -}}
{{- end -}}
{{- if $lines -}}
{{- if .path -}}{{- $lines = prepend $lines (printf "[%s]" .path) -}}{{- end -}}
{{- $out = append $out (join "\n" $lines) -}}
{{- end -}}
{{- range $k, $v := .table -}}
{{- if kindIs "map" $v -}}
{{- $key := include "strata.tomlKey" $k -}}
{{- $sub := include "strata.toml" (dict "table" $v "path" (ternary (printf "%s.%s" $.path $key) $key (ne $.path ""))) -}}
{{- if $sub -}}{{- $out = append $out $sub -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- join "\n\n" $out -}}
{{- end -}}

{{- define "strata.tomlKey" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{- . -}}{{- else -}}{{- toJson . -}}{{- end -}}
{{- end -}}

{{- define "strata.tomlValue" -}}
{{- if kindIs "slice" . -}}
{{- $items := list -}}
{{- range . -}}{{- $items = append $items (include "strata.tomlValue" .) -}}{{- end -}}
[{{ join ", " $items }}]
{{- else if kindIs "map" . -}}
{{- $items := list -}}
{{- range $k, $v := . -}}{{- $items = append $items (printf "%s = %s" (include "strata.tomlKey" $k) (include "strata.tomlValue" $v)) -}}{{- end -}}
{{ "{" }}{{ join ", " $items }}{{ "}" }}
{{- else if and (kindIs "float64" .) (eq . (float64 (int64 .))) -}}
{{- int64 . -}}
{{- else -}}
{{- toJson . -}}
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
{{- /* The daemon's attend::default_region_bytes: 1/leaf_tokens (a whole
  block counts as 16 tokens), plus five sixteenths with key_sketch. */ -}}
{{- $per := 16 -}}
{{- if $c.compute.leaf_tokens -}}
{{- $per = int64 $c.compute.leaf_tokens -}}
{{- end -}}
{{- $abstracts = div (add $dram $nvme) $per -}}
{{- if $c.compute.key_sketch -}}
{{- $abstracts = add $abstracts (mul (div (add $dram $nvme) 16) 5) -}}
{{- end -}}
{{- $abstracts = max $abstracts 1048576 -}}
{{- end -}}
{{- end -}}
{{- $runs := 0 -}}
{{- if and $c.compute.key_sketch $c.compute.sketch_runs -}}
{{- $runs = include "strata.bytes" $c.compute.sketch_runs_bytes | int64 -}}
{{- if eq $runs 0 -}}
{{- $runs = max (div $dram 8) 1048576 -}}
{{- end -}}
{{- end -}}
{{- $quant := include "strata.bytes" ($c.compute.quant_bytes | default "0") | int64 -}}
{{- $index := mul (int64 $c.store.max_blocks) 128 -}}
{{- $events := mul (int64 $c.store.event_buffer) 96 -}}
{{- $io := 0 -}}
{{- if gt $nvme 0 -}}
{{- $io = mul (int64 $c.tiers.nvme.io_buffers) (include "strata.bytes" $c.tiers.nvme.io_buffer_bytes | int64) -}}
{{- end -}}
{{- $puts := include "strata.bytes" $c.server.max_inflight_put_bytes | int64 -}}
{{- $overhead := include "strata.bytes" .Values.resources.memoryOverhead | int64 -}}
{{- $total := add $dram $abstracts $runs $quant $index $events $io $puts $overhead -}}
{{- div (add $total 1048575) 1048576 -}}
{{- end -}}

{{- define "strata.memory" -}}
{{- .Values.resources.memory | default (printf "%sMi" (include "strata.memoryMiB" .)) -}}
{{- end -}}

{{/*
The pod's grace period, seconds: the drain waits up to
server.drain_timeout_ms twice (puts settling, then calls in flight) and,
with the NVMe tier, writes DRAM down for up to
tiers.nvme.drain_write_down_timeout_ms (daemon/config/default.toml);
15 s more for the exit itself.
*/}}
{{- define "strata.gracePeriodSeconds" -}}
{{- $c := include "strata.configDict" . | fromYaml -}}
{{- $ms := mul (int64 $c.server.drain_timeout_ms) 2 -}}
{{- if and (gt (include "strata.bytes" $c.tiers.nvme.bytes | int64) 0) $c.tiers.nvme.drain_write_down -}}
{{- $ms = add $ms (int64 $c.tiers.nvme.drain_write_down_timeout_ms) -}}
{{- end -}}
{{- add (div (add $ms 999) 1000) 15 -}}
{{- end -}}

{{/*
The one place that knows catena's command-line interface. When a flag of
catena-agent is renamed, change it here only.
  agent:     flags of `catena-agent` (the daemon)
  install:   flags of `catena-agent install-cni` / `uninstall-cni`
             (agent/src/install: InstallArgs)
*/}}
{{- define "catena.cli" -}}
binaries:
  agent: /usr/local/bin/catena-agent
  cni: /usr/local/bin/catena-cni
  cli: /usr/local/bin/catena
subcommands:
  install: install-cni
  uninstall: uninstall-cni
agent:
  socket: --socket
  bpffsDir: --bpffs-dir
  stateDir: --state-dir
  logFormat: --log-format
  kubeconfig: --kubeconfig
  kubeProxyReplacement: --kube-proxy-replacement
  healthzBindAddress: --healthz-bind-address
  devices: --devices
  lbAlgorithm: --lb-algorithm
install:
  confDir: --cni-conf-dir
  binDir: --cni-bin-dir
  chainingMode: --chaining-mode
  chainingTarget: --chaining-target
  customConf: --custom-conf
  confFileName: --conf-file-name
  exclusive: --exclusive
  cniBinary: --cni-binary
  agentSocket: --cni-agent-socket
  stateDir: --cni-state-dir
  logFile: --cni-log-file
{{- end -}}

{{- define "catena.name" -}}
{{- .Values.nameOverride | default "catena" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "catena.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "catena.name" .) -}}
{{- end -}}

{{- define "catena.labels" -}}
app.kubernetes.io/name: {{ include "catena.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "catena.selectorLabels" -}}
app.kubernetes.io/name: {{ include "catena.name" . }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "catena.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "catena.chainingModes" -}}
generic-veth kube-ovn calico flannel portmap none
{{- end -}}

{{/*
kubeProxyReplacement normalised to what the agent takes: "false", "true" or
"partial". `--set kubeProxyReplacement=false` arrives as a boolean, "strict"
and Cilium's older spellings as strings.
*/}}
{{- define "catena.kpr" -}}
{{- $v := toString .Values.kubeProxyReplacement | lower -}}
{{- if or (eq $v "") (eq $v "false") (eq $v "disabled") (eq $v "<nil>") -}}false
{{- else if or (eq $v "true") (eq $v "strict") -}}true
{{- else if or (eq $v "partial") (eq $v "probe") -}}partial
{{- else -}}
{{- fail (printf "kubeProxyReplacement=%q is not one of false, true, strict, partial (or Cilium's disabled, probe)" (toString .Values.kubeProxyReplacement)) -}}
{{- end -}}
{{- end -}}

{{- define "catena.devices" -}}
{{- if kindIs "slice" .Values.devices -}}{{ join "," .Values.devices }}{{- else -}}{{ toString (.Values.devices | default "") }}{{- end -}}
{{- end -}}

{{/*
Agent settings: ConfigMap key -> value. The ConfigMap is their source of
truth; the DaemonSet turns each key into `--<flag>=$(ENV)` (see
catena.agentEnvArgs). Only settings that are on are listed, so flags the agent
does not need are not passed.
*/}}
{{- define "catena.agentSettings" -}}
socket: {{ .Values.agent.socket | quote }}
bpffsDir: {{ .Values.agent.bpffsDir | quote }}
stateDir: {{ .Values.agent.stateDir | quote }}
logFormat: {{ .Values.agent.logFormat | quote }}
{{- if .Values.agent.kubeconfig }}
kubeconfig: "/etc/catena/kubeconfig"
{{- end }}
{{- $kpr := include "catena.kpr" . }}
{{- if ne $kpr "false" }}
kubeProxyReplacement: {{ $kpr | quote }}
healthzBindAddress: {{ printf "0.0.0.0:%v" .Values.agent.healthzPort | quote }}
{{- end }}
{{- $devices := include "catena.devices" . }}
{{- if $devices }}
devices: {{ $devices | quote }}
{{- end }}
lbAlgorithm: {{ include "catena.lbAlgorithm" . | quote }}
{{- end -}}

{{/* loadBalancer.algorithm, checked in catena.validate; "random" when unset. */}}
{{- define "catena.lbAlgorithm" -}}
{{- (.Values.loadBalancer | default dict).algorithm | default "random" | toString -}}
{{- end -}}

{{/* "bpffsDir" -> "CATENA_BPFFS_DIR" */}}
{{- define "catena.envName" -}}
{{- printf "CATENA_%s" (snakecase . | upper) -}}
{{- end -}}

{{/* The installer's flags, shared by install-cni and the preStop uninstall-cni. */}}
{{- define "catena.installArgs" -}}
{{- $f := (include "catena.cli" . | fromYaml).install -}}
- {{ printf "%s=/host%s" $f.confDir .Values.cni.confPath | quote }}
- {{ printf "%s=/host%s" $f.binDir .Values.cni.binPath | quote }}
- {{ printf "%s=%s" $f.chainingMode .Values.cni.chainingMode | quote }}
{{- if .Values.cni.chainingTarget }}
- {{ printf "%s=%s" $f.chainingTarget .Values.cni.chainingTarget | quote }}
{{- end }}
{{- if .Values.cni.customConf }}
- {{ printf "%s=/etc/catena/cni-configuration/%s" $f.customConf .Values.cni.configMapKey | quote }}
{{- end }}
- {{ printf "%s=%s" $f.confFileName .Values.cni.confFileName | quote }}
{{- if .Values.cni.exclusive }}
- {{ $f.exclusive | quote }}
{{- end }}
- {{ printf "%s=%s" $f.cniBinary (include "catena.cli" . | fromYaml).binaries.cni | quote }}
{{- if ne .Values.agent.socket "/run/catena/agent.sock" }}
- {{ printf "%s=%s" $f.agentSocket .Values.agent.socket | quote }}
{{- end }}
{{- if ne .Values.agent.stateDir "/var/lib/catena" }}
- {{ printf "%s=%s" $f.stateDir .Values.agent.stateDir | quote }}
{{- end }}
{{- if .Values.cni.logFile }}
- {{ printf "%s=%s" $f.logFile .Values.cni.logFile | quote }}
{{- end }}
{{- end -}}

{{/* Checks that would otherwise surface as a broken node, not a failed install. */}}
{{- define "catena.validate" -}}
{{- $modes := splitList " " (include "catena.chainingModes" .) -}}
{{- if not (has .Values.cni.chainingMode $modes) -}}
{{- fail (printf "cni.chainingMode=%q is not one of: %s" (toString .Values.cni.chainingMode) (join ", " $modes)) -}}
{{- end -}}
{{- if and .Values.cni.customConf (not .Values.cni.configMap) -}}
{{- fail "cni.customConf=true needs cni.configMap: the name of the ConfigMap (in the release namespace) whose key cni.configMapKey holds the chained conflist" -}}
{{- end -}}
{{- if and .Values.cni.customConf (not .Values.cni.configMapKey) -}}
{{- fail "cni.customConf=true needs cni.configMapKey (default cni-config)" -}}
{{- end -}}
{{- if not (regexMatch "^[^/.][^/]*\\.conflist$" .Values.cni.confFileName) -}}
{{- fail (printf "cni.confFileName=%q must be a plain file name ending in .conflist (runtimes read only *.conflist as plugin lists)" .Values.cni.confFileName) -}}
{{- end -}}
{{- if not (and (hasPrefix "/" .Values.cni.confPath) (hasPrefix "/" .Values.cni.binPath)) -}}
{{- fail "cni.confPath and cni.binPath must be absolute host paths" -}}
{{- end -}}
{{- $kpr := include "catena.kpr" . -}}
{{- if and (eq $kpr "true") (not .Values.k8sServiceHost) -}}
{{- fail (printf "kubeProxyReplacement=%s needs k8sServiceHost and k8sServicePort (the API server's address): without kube-proxy the agent, in the host network, cannot reach the API server through the kubernetes Service" (toString .Values.kubeProxyReplacement)) -}}
{{- end -}}
{{- if and .Values.k8sServiceHost (not .Values.k8sServicePort) -}}
{{- fail "k8sServiceHost is set but k8sServicePort is not (usually 6443)" -}}
{{- end -}}
{{- if and .Values.k8sServicePort (not .Values.k8sServiceHost) -}}
{{- fail "k8sServicePort is set but k8sServiceHost is not" -}}
{{- end -}}
{{- $lb := include "catena.lbAlgorithm" . -}}
{{- if not (has $lb (list "random" "maglev")) -}}
{{- fail (printf "loadBalancer.algorithm=%q is not random or maglev" $lb) -}}
{{- end -}}
{{- if not (has .Values.agent.logFormat (list "text" "json")) -}}
{{- fail (printf "agent.logFormat=%q is not text or json" .Values.agent.logFormat) -}}
{{- end -}}
{{- if not .Values.securityContext.privileged -}}
{{- $caps := list -}}
{{- range ((.Values.securityContext.capabilities | default dict).add | default list) }}{{ $caps = append $caps (upper (trimPrefix "CAP_" .)) }}{{ end -}}
{{- if not (and (has "NET_ADMIN" $caps) (or (has "BPF" $caps) (has "SYS_ADMIN" $caps))) -}}
{{- fail (printf "securityContext.capabilities.add=%v: an unprivileged agent needs at least NET_ADMIN and BPF (or SYS_ADMIN on kernels < 5.8); or set securityContext.privileged=true" $caps) -}}
{{- end -}}
{{- end -}}
{{- end -}}

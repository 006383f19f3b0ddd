{{/*
The DaemonSet that runs `pullproxy uninstall` on every node. Used by the pre-delete hook
(hook=true) and rendered on its own into deploy/manifests/uninstall.yaml for clusters without Helm.
*/}}
{{- define "pullproxy.uninstallDaemonSet" -}}
{{- $ := .ctx }}
{{- $name := printf "%s-uninstall" (include "pullproxy.fullname" $) }}
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {{ $name }}
  namespace: {{ $.Release.Namespace }}
  labels:
    {{- include "pullproxy.commonLabels" $ | nindent 4 }}
    app.kubernetes.io/component: uninstall
  {{- if .hook }}
  annotations:
    helm.sh/hook: pre-delete
    helm.sh/hook-weight: "-10"
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
  {{- end }}
spec:
  selector:
    matchLabels:
      app.kubernetes.io/name: {{ include "pullproxy.name" $ }}
      app.kubernetes.io/instance: {{ $.Release.Name }}
      app.kubernetes.io/component: uninstall
  template:
    metadata:
      labels:
        app.kubernetes.io/name: {{ include "pullproxy.name" $ }}
        app.kubernetes.io/instance: {{ $.Release.Name }}
        app.kubernetes.io/component: uninstall
    spec:
      automountServiceAccountToken: false
      priorityClassName: {{ $.Values.priorityClassName }}
      terminationGracePeriodSeconds: 1
      {{- with $.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $.Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $.Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $.Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      initContainers:
      # Removing pins needs no capability: uid 0 owns them (measured, tests/tests/capabilities.rs).
      - name: uninstall
        image: {{ include "pullproxy.image" $ }}
        imagePullPolicy: {{ $.Values.image.pullPolicy }}
        args: ["uninstall"]
        env:
        - name: PULLPROXY_CONFIG
          value: {{ include "pullproxy.configDir" $ }}/pullproxy.yaml
        securityContext:
          {{- include "pullproxy.securityContext" $ | nindent 10 }}
          capabilities:
            drop: [ALL]
        volumeMounts:
        - name: config
          mountPath: {{ include "pullproxy.configDir" $ }}
          readOnly: true
        - name: bpffs
          mountPath: /sys/fs/bpf
          mountPropagation: HostToContainer
      containers:
      # Keeps the pod Ready once the init container succeeded, which is what the Job waits for.
      - name: done
        image: {{ $.Values.uninstall.pauseImage }}
        securityContext:
          runAsNonRoot: true
          runAsUser: 65534
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities:
            drop: [ALL]
        resources:
          requests:
            cpu: 1m
            memory: 8Mi
          limits:
            memory: 16Mi
      volumes:
      - name: config
        configMap:
          name: {{ include "pullproxy.fullname" $ }}
          defaultMode: 292 # 0444
      - name: bpffs
        hostPath:
          path: {{ $.Values.hostPaths.bpffs }}
          type: Directory
{{- end }}

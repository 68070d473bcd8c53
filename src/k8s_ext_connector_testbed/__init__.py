"""Development-only harness around upstream Kubernetes: not part of the shipped product.

``k8s_ext_connector_testbed.controlplane.ControlPlane`` runs etcd, kube-apiserver,
kube-controller-manager and kube-scheduler (binaries built by ``scripts/kube-binaries.sh``,
see docs/kubernetes.md) for the tests and, later, the lab. The image does not carry this
package (.dockerignore).
"""

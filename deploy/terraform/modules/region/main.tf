# One region: a namespace, the Secret with the mesh's sync secret and the admin
# token, and the bucketmesh chart configured with every other region as a peer.
# The kubernetes and helm providers are the caller's, configured for this
# region's cluster (../../main.tf passes one pair per region).

resource "kubernetes_namespace_v1" "this" {
  metadata {
    name = var.namespace
    labels = {
      "app.kubernetes.io/part-of" = "bucketmesh"
      "bucketmesh.io/region"      = var.region
      # the chart runs as non-root with a read-only root filesystem, no capabilities
      "pod-security.kubernetes.io/enforce" = "restricted"
    }
  }
}

resource "kubernetes_secret_v1" "this" {
  metadata {
    name      = "${var.release_name}-secrets"
    namespace = kubernetes_namespace_v1.this.metadata[0].name
    labels = {
      "app.kubernetes.io/part-of" = "bucketmesh"
    }
  }
  type = "Opaque"
  # the Redis URL (it may hold a password) only for a region on the redis backend:
  # the chart reads it from here under the key redis-url (secret.redisUrlKey)
  data = merge(
    {
      "sync-secret" = var.sync_secret
      "admin-token" = var.admin_token
    },
    var.redis_url == "" ? {} : { "redis-url" = var.redis_url }
  )
}

resource "helm_release" "this" {
  name      = var.release_name
  namespace = kubernetes_namespace_v1.this.metadata[0].name
  chart     = var.chart
  # a failed install or upgrade is rolled back; a node restoring a large state
  # may take minutes to become ready (the chart's startup probe allows 10)
  atomic  = true
  wait    = true
  timeout = 900

  values = [
    yamlencode({
      fullnameOverride = var.release_name
      region           = var.region
      sync = {
        enabled       = true
        syncClusterId = var.sync_cluster_id
        peers         = var.peers
        peerUrls      = { for region, url in var.peer_urls : region => url if region != var.region }
        service = {
          type = var.sync_service_type
        }
      }
      secret = {
        existingSecret = kubernetes_secret_v1.this.metadata[0].name
      }
      image = {
        repository = var.image_repository
        tag        = var.image_tag
      }
    }),
    yamlencode(var.values),
    yamlencode(var.region_values),
  ]
}

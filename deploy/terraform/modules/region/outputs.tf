output "summary" {
  description = "Where this region's bucketmesh runs."
  value = {
    region      = var.region
    namespace   = helm_release.this.namespace
    release     = helm_release.this.name
    status      = helm_release.this.status
    api_service = "${helm_release.this.name}.${helm_release.this.namespace}.svc"
    sync_url    = var.peer_urls[var.region]
  }
}

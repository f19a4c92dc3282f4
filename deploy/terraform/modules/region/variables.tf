variable "region" {
  description = "The region this cluster serves (1-63 letters, digits, '.', '_' or '-')."
  type        = string
  validation {
    condition     = can(regex("^[A-Za-z0-9._-]{1,63}$", var.region))
    error_message = "The region must be 1-63 letters, digits, '.', '_' or '-'."
  }
}

variable "peers" {
  description = "Every region of the mesh, this one included (it is skipped)."
  type        = list(string)
}

variable "peer_urls" {
  description = "Region -> URL of its sync Service, for every region of the mesh."
  type        = map(string)
}

variable "sync_cluster_id" {
  description = "The mesh's id: the same in every region."
  type        = string
}

variable "sync_secret" {
  description = "The mesh's HMAC secret: the same in every region."
  type        = string
  sensitive   = true
}

variable "admin_token" {
  description = "Bearer token for PATCH and /v1/admin/faults."
  type        = string
  sensitive   = true
}

variable "redis_url" {
  description = "The region's Redis URL, for values.storage.backend = \"redis\" (kept in the Secret, never in values: the chart refuses storage.redisUrl beside an existing Secret)."
  type        = string
  default     = ""
  sensitive   = true
}

variable "namespace" {
  description = "The namespace created for bucketmesh in this cluster."
  type        = string
}

variable "release_name" {
  description = "The Helm release name."
  type        = string
}

variable "chart" {
  description = "Path (or repository reference) of the bucketmesh chart."
  type        = string
}

variable "image_repository" {
  description = "The bucketmesh image (built from the repository's Dockerfile)."
  type        = string
}

variable "image_tag" {
  description = "The image tag; empty for the chart's appVersion."
  type        = string
}

variable "sync_service_type" {
  description = "Type of the Service the other regions send deltas to."
  type        = string
}

variable "values" {
  description = "More chart values (buckets, storage, resources, ...), merged after the module's own."
  type        = any
}

variable "region_values" {
  description = "Chart values for this region alone (e.g. reconcile.enabled in one region), merged last."
  type        = any
  default     = {}
}

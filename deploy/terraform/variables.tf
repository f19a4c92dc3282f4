variable "regions" {
  description = <<-EOT
    Every region of the mesh: its kubeconfig context and the URL its sync Service
    is reached at from the other regions. main.tf has one provider pair and one
    module block per region (Terraform cannot for_each over providers): adding a
    region means adding its entry here and its blocks there.
  EOT
  type = map(object({
    kube_context = string
    sync_url     = string
  }))
  default = {
    "us-east-1" = {
      kube_context = "us-east-1"
      sync_url     = "http://bucketmesh-sync.us-east-1.example.com:8080"
    }
    "us-west-2" = {
      kube_context = "us-west-2"
      sync_url     = "http://bucketmesh-sync.us-west-2.example.com:8080"
    }
    "eu-central-1" = {
      kube_context = "eu-central-1"
      sync_url     = "http://bucketmesh-sync.eu-central-1.example.com:8080"
    }
  }
  validation {
    condition     = length(var.regions) == 3 && alltrue([for region in ["us-east-1", "us-west-2", "eu-central-1"] : contains(keys(var.regions), region)])
    error_message = "The regions must be us-east-1, us-west-2 and eu-central-1, the ones main.tf has provider and module blocks for; for another set, edit those blocks too."
  }
  validation {
    condition     = alltrue([for region in values(var.regions) : can(regex("^https?://", region.sync_url))])
    error_message = "Each sync_url must be an http:// or https:// URL."
  }
}

variable "kubeconfig_path" {
  description = "The kubeconfig holding every region's context."
  type        = string
  default     = "~/.kube/config"
}

variable "namespace" {
  description = "The namespace created for bucketmesh in each cluster."
  type        = string
  default     = "bucketmesh"
}

variable "release_name" {
  description = "The Helm release (and Service) name in each cluster."
  type        = string
  default     = "bucketmesh"
}

variable "chart" {
  description = "The bucketmesh chart; empty for this repository's deploy/helm/bucketmesh."
  type        = string
  default     = ""
}

variable "sync_cluster_id" {
  description = "The mesh's id, the same in every region."
  type        = string
  default     = "global-rate-limit-cluster"
}

variable "image_repository" {
  description = "The bucketmesh image (docker build -t REPOSITORY:TAG . at the repository's root, pushed)."
  type        = string
  default     = "bucketmesh"
}

variable "image_tag" {
  description = "The image tag; empty for the chart's appVersion."
  type        = string
  default     = ""
}

variable "sync_service_type" {
  description = "Type of each region's sync Service (LoadBalancer to reach it from the other clusters)."
  type        = string
  default     = "LoadBalancer"
}

variable "values" {
  description = "More chart values for every region (buckets, storage, resources, serviceMonitor, ...)."
  type        = any
  default     = {}
}

variable "region_values" {
  description = "Region -> chart values for that region alone, merged after values (e.g. { \"us-east-1\" = { reconcile = { enabled = true } } }: the reconcile CronJob and the autoscale controller run in one region)."
  type        = any
  default     = {}
}

variable "redis_urls" {
  description = "Region -> its Redis URL, for the regions whose values set storage.backend = \"redis\"; kept in each region's Secret (it may hold a password)."
  type        = map(string)
  default     = {}
  sensitive   = true
}

# bucketmesh in every region, with one `terraform apply`: one Kubernetes cluster
# per region, each running the chart with every other region as a peer and one
# shared sync secret.
#
# Terraform does not allow for_each (or count) on a provider block, nor a
# different provider per instance of a module with for_each: each region has its
# own provider pair and module block below, all wired from var.regions (which is
# validated to name exactly these regions, so the two cannot drift apart).

locals {
  chart     = var.chart != "" ? var.chart : "${path.module}/../helm/bucketmesh"
  peers     = sort(keys(var.regions))
  peer_urls = { for region, cluster in var.regions : region => cluster.sync_url }
}

# One sync secret for the whole mesh (every message between regions is signed with it).
resource "random_password" "sync_secret" {
  length  = 48
  special = false
}

resource "random_password" "admin_token" {
  length  = 32
  special = false
}

# -- us-east-1 -------------------------------------------------------------------

provider "kubernetes" {
  alias          = "us_east_1"
  config_path    = var.kubeconfig_path
  config_context = var.regions["us-east-1"].kube_context
}

provider "helm" {
  alias = "us_east_1"
  kubernetes {
    config_path    = var.kubeconfig_path
    config_context = var.regions["us-east-1"].kube_context
  }
}

module "us_east_1" {
  source = "./modules/region"
  providers = {
    kubernetes = kubernetes.us_east_1
    helm       = helm.us_east_1
  }
  region            = "us-east-1"
  peers             = local.peers
  peer_urls         = local.peer_urls
  sync_cluster_id   = var.sync_cluster_id
  sync_secret       = random_password.sync_secret.result
  admin_token       = random_password.admin_token.result
  redis_url         = lookup(var.redis_urls, "us-east-1", "")
  namespace         = var.namespace
  release_name      = var.release_name
  chart             = local.chart
  image_repository  = var.image_repository
  image_tag         = var.image_tag
  sync_service_type = var.sync_service_type
  values            = var.values
  region_values     = lookup(var.region_values, "us-east-1", {})
}

# -- us-west-2 -------------------------------------------------------------------

provider "kubernetes" {
  alias          = "us_west_2"
  config_path    = var.kubeconfig_path
  config_context = var.regions["us-west-2"].kube_context
}

provider "helm" {
  alias = "us_west_2"
  kubernetes {
    config_path    = var.kubeconfig_path
    config_context = var.regions["us-west-2"].kube_context
  }
}

module "us_west_2" {
  source = "./modules/region"
  providers = {
    kubernetes = kubernetes.us_west_2
    helm       = helm.us_west_2
  }
  region            = "us-west-2"
  peers             = local.peers
  peer_urls         = local.peer_urls
  sync_cluster_id   = var.sync_cluster_id
  sync_secret       = random_password.sync_secret.result
  admin_token       = random_password.admin_token.result
  redis_url         = lookup(var.redis_urls, "us-west-2", "")
  namespace         = var.namespace
  release_name      = var.release_name
  chart             = local.chart
  image_repository  = var.image_repository
  image_tag         = var.image_tag
  sync_service_type = var.sync_service_type
  values            = var.values
  region_values     = lookup(var.region_values, "us-west-2", {})
}

# -- eu-central-1 ----------------------------------------------------------------

provider "kubernetes" {
  alias          = "eu_central_1"
  config_path    = var.kubeconfig_path
  config_context = var.regions["eu-central-1"].kube_context
}

provider "helm" {
  alias = "eu_central_1"
  kubernetes {
    config_path    = var.kubeconfig_path
    config_context = var.regions["eu-central-1"].kube_context
  }
}

module "eu_central_1" {
  source = "./modules/region"
  providers = {
    kubernetes = kubernetes.eu_central_1
    helm       = helm.eu_central_1
  }
  region            = "eu-central-1"
  peers             = local.peers
  peer_urls         = local.peer_urls
  sync_cluster_id   = var.sync_cluster_id
  sync_secret       = random_password.sync_secret.result
  admin_token       = random_password.admin_token.result
  redis_url         = lookup(var.redis_urls, "eu-central-1", "")
  namespace         = var.namespace
  release_name      = var.release_name
  chart             = local.chart
  image_repository  = var.image_repository
  image_tag         = var.image_tag
  sync_service_type = var.sync_service_type
  values            = var.values
  region_values     = lookup(var.region_values, "eu-central-1", {})
}

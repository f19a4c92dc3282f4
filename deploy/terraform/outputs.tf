output "regions" {
  description = "Per region: namespace, release, status, in-cluster API Service and sync URL."
  value = {
    "us-east-1"    = module.us_east_1.summary
    "us-west-2"    = module.us_west_2.summary
    "eu-central-1" = module.eu_central_1.summary
  }
}

output "admin_token" {
  description = "The bearer token for PATCH /v1/buckets/{key} in every region."
  value       = random_password.admin_token.result
  sensitive   = true
}

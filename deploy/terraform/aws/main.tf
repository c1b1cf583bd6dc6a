# An AWS Secrets Manager secret with the Rancher API key, tagged for the agent, and a policy for
# the agent's role (IRSA or instance role) that reads only tagged secrets.

terraform {
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}

variable "region" {
  type = string
}

variable "secret_name" {
  type    = string
  default = "rancher-api-key"
}

variable "rancher_access_key" {
  type      = string
  sensitive = true
}

variable "rancher_secret_key" {
  type      = string
  sensitive = true
}

provider "aws" {
  region = var.region
}

resource "aws_secretsmanager_secret" "rancher_api_key" {
  name = var.secret_name
  # The agent checks this tag (DescribeSecret) before reading the value.
  tags = {
    "apono-connector-read" = "true"
  }
}

resource "aws_secretsmanager_secret_version" "rancher_api_key" {
  secret_id = aws_secretsmanager_secret.rancher_api_key.id
  secret_string = jsonencode({
    access_key = var.rancher_access_key
    secret_key = var.rancher_secret_key
  })
}

# Attach to the agent's role: read tagged secrets only.
resource "aws_iam_policy" "apono_connector_read" {
  name = "apono-connector-read-tagged-secrets"
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect   = "Allow"
      Action   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
      Resource = "*"
      Condition = {
        StringEquals = { "secretsmanager:ResourceTag/apono-connector-read" = "true" }
      }
    }]
  })
}

output "secret_store" {
  value = jsonencode({
    type      = "AWS"
    region    = var.region
    secret_id = aws_secretsmanager_secret.rancher_api_key.name
  })
}

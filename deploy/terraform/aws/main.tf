# An AWS Secrets Manager secret with the Rancher API key, tagged for the agent, and a policy that
# reads only tagged secrets, attached to the agent's role (IRSA, ECS task or instance role).
#
# The agent calls DescribeSecret (to see the tag) and then GetSecretValue, so the policy allows
# exactly those two, on secrets tagged apono-connector-read=true; plus kms:Decrypt on the customer
# key when the secret is encrypted with one (kms_key_arn).

terraform {
  required_version = ">= 1.3"
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

variable "agent_role_name" {
  type        = string
  default     = null
  description = "Name of the IAM role the agent runs as; the read policy is attached to it. Null: attach the output read_policy_arn yourself."
}

variable "kms_key_arn" {
  type        = string
  default     = null
  description = "ARN of a customer-managed KMS key to encrypt the secret with. Null: the AWS-managed key (aws/secretsmanager), which needs no grant."
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
  name       = var.secret_name
  kms_key_id = var.kms_key_arn
  # The agent checks this tag (DescribeSecret) before reading the value, and the policy below
  # reads only secrets that carry it.
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

locals {
  read_tagged_secrets = {
    Effect   = "Allow"
    Action   = ["secretsmanager:DescribeSecret", "secretsmanager:GetSecretValue"]
    Resource = "*"
    Condition = {
      StringEquals = { "secretsmanager:ResourceTag/apono-connector-read" = "true" }
    }
  }
  # Only through Secrets Manager, only with the given key.
  decrypt_with_customer_key = {
    Effect   = "Allow"
    Action   = ["kms:Decrypt"]
    Resource = var.kms_key_arn
    Condition = {
      StringEquals = { "kms:ViaService" = "secretsmanager.${var.region}.amazonaws.com" }
    }
  }
}

resource "aws_iam_policy" "apono_connector_read" {
  # A prefix, not a fixed name: a second copy of this example in the same account (another
  # region, another cluster) gets its own policy instead of a name collision.
  name_prefix = "apono-connector-read-"
  description = "apono-connector: read Secrets Manager secrets tagged apono-connector-read=true"
  policy = jsonencode({
    Version   = "2012-10-17"
    Statement = concat([local.read_tagged_secrets], var.kms_key_arn == null ? [] : [local.decrypt_with_customer_key])
  })
}

resource "aws_iam_role_policy_attachment" "agent_reads" {
  count      = var.agent_role_name == null ? 0 : 1
  role       = var.agent_role_name
  policy_arn = aws_iam_policy.apono_connector_read.arn
}

output "read_policy_arn" {
  description = "The read policy, for a role this example does not attach it to."
  value       = aws_iam_policy.apono_connector_read.arn
}

output "secret_store" {
  value = jsonencode({
    type      = "AWS"
    region    = var.region
    secret_id = aws_secretsmanager_secret.rancher_api_key.name
  })
}

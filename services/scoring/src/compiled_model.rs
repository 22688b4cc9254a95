//! A validated model with its rule conditions compiled: built once per model
//! version and shared (it is `Send + Sync`) by every evaluation.

use clm_proto::scoring as proto;

use crate::feature_map::FeatureSet;
use crate::model::Model;
use crate::model_proto::field_order;
use crate::rules::CompiledCondition;
use crate::validation::{CompiledRules, ModelViolation, validate_and_compile};

/// A valid model, ready to evaluate customers.
#[derive(Debug)]
pub struct CompiledModel {
    model: Model,
    rules: CompiledRules,
    /// The features stage and health rules reference.
    rule_features: FeatureSet,
    /// The features fit rules reference.
    fit_features: FeatureSet,
}

impl CompiledModel {
    /// Validates `model` and compiles its rules; on failure, every problem,
    /// in field order.
    pub fn compile(model: Model) -> Result<Self, Vec<ModelViolation>> {
        let rules = validate_and_compile(&model)?;
        let union = |conditions: &[CompiledCondition]| {
            let mut set = FeatureSet::default();
            for condition in conditions {
                set.extend(condition.references());
            }
            set
        };
        let mut rule_features = union(&rules.stage);
        rule_features.extend(union(&rules.health));
        let fit_features = union(&rules.fit);
        Ok(Self {
            model,
            rules,
            rule_features,
            fit_features,
        })
    }

    /// Converts, validates and compiles a model received over gRPC; on
    /// failure, every problem (conversion and validation alike), in field
    /// order.
    pub fn from_proto(message: &proto::Model) -> Result<Self, Vec<ModelViolation>> {
        let (model, mut violations) = Model::from_proto(message);
        match Self::compile(model) {
            Ok(compiled) if violations.is_empty() => Ok(compiled),
            Ok(_) => Err(violations),
            Err(more) => {
                // a field that could not be converted is reported once
                let converted: Vec<String> = violations.iter().map(|v| v.field.clone()).collect();
                violations.extend(more.into_iter().filter(|v| !converted.contains(&v.field)));
                violations.sort_by_key(|violation| field_order(&violation.field));
                Err(violations)
            }
        }
    }

    /// The problems of a model; empty when it is valid.
    pub fn validate(model: &Model) -> Vec<ModelViolation> {
        Self::compile(model.clone()).err().unwrap_or_default()
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The model's version.
    pub fn version(&self) -> &str {
        &self.model.version
    }

    pub(crate) fn rules(&self) -> &CompiledRules {
        &self.rules
    }

    /// The features any rule references.
    pub(crate) fn bound_features(&self) -> FeatureSet {
        let mut set = self.rule_features;
        set.extend(self.fit_features);
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_shareable_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CompiledModel>();
    }
}

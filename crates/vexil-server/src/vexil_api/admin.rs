//! `vexil.v1.AdminService`: wire → access check → store → wire. A write wakes the store source, so
//! this process serves it at once (other processes find it with their version check).

use std::sync::Arc;

use tonic::{Request, Response, Status};
use vexil_proto::vexil::v1 as pb;
use vexil_proto::vexil::v1::admin_service_server::AdminService;
use vexil_store::{
    ApiKeyInput, AuditFilter, EnvironmentInput, ExperimentStatus, FlagInput, FlagSetInput, Role, SegmentInput,
    StoreError,
};

use vexil_service::results::{ResultsError, ResultsOptions};

use super::Managed;
use super::auth::{Need, Principal};
use super::convert::{self, next_token, page, precondition, required};
use crate::error::{ErrorKind, grpc_status, store_status};

#[derive(Debug, Clone)]
pub struct Admin {
    pub managed: Arc<Managed>,
}

type Reply<T> = Result<Response<T>, Status>;

impl Admin {
    async fn allow<T>(&self, request: &Request<T>, environment: Option<&str>) -> Result<Principal, Status> {
        self.managed.check(request, Need::Admin(environment)).await
    }

    /// An experiment's lifecycle step.
    async fn transition(
        &self,
        request: Request<pb::TransitionExperimentRequest>,
        to: ExperimentStatus,
    ) -> Reply<pb::PutExperimentResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        let who = self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let written = self
            .managed
            .store
            .transition_experiment(
                who.actor(),
                environment,
                r.key,
                to,
                (!r.winner.is_empty()).then_some(r.winner),
                precondition(r.version, false),
            )
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::PutExperimentResponse {
            config_version: self.wrote(written.config_version),
            experiment: Some(convert::experiment(written.value)),
        }))
    }

    fn wrote(&self, config_version: Option<i64>) -> i64 {
        if config_version.is_some() {
            self.managed.config_written();
        }
        config_version.unwrap_or(0)
    }
}

fn flag_input(
    definition: Option<vexil_proto::JsonStruct>,
    description: String,
    owner: String,
    tags: Vec<String>,
) -> Result<FlagInput, Status> {
    let Some(definition) = definition else {
        return Err(store_status(StoreError::invalid(
            "/definition",
            "a flag needs its flagd definition",
        )));
    };
    Ok(FlagInput {
        definition: serde_json::Value::Object(definition.into_map()),
        description,
        owner,
        tags,
    })
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn list_environments(
        &self,
        request: Request<pb::ListEnvironmentsRequest>,
    ) -> Reply<pb::ListEnvironmentsResponse> {
        self.allow(&request, None).await?;
        let r = request.into_inner();
        let listed = self
            .managed
            .store
            .list_environments(page(r.page_size, r.page_token)?)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListEnvironmentsResponse {
            environments: listed.items.into_iter().map(convert::environment).collect(),
            next_page_token: next_token(listed.next),
        }))
    }

    async fn get_environment(&self, request: Request<pb::GetEnvironmentRequest>) -> Reply<pb::Environment> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.allow(&request, Some(&environment)).await?;
        let found = self
            .managed
            .store
            .get_environment(environment)
            .await
            .map_err(store_status)?;
        Ok(Response::new(convert::environment(found)))
    }

    async fn create_environment(&self, request: Request<pb::CreateEnvironmentRequest>) -> Reply<pb::Environment> {
        let who = self.allow(&request, None).await?;
        let r = request.into_inner();
        let input = EnvironmentInput {
            name: r.name,
            description: r.description,
        };
        let created = self
            .managed
            .store
            .create_environment(who.actor(), r.key, input)
            .await
            .map_err(store_status)?;
        self.managed
            .environment_changed(created.key.clone(), created.config_version);
        Ok(Response::new(convert::environment(created)))
    }

    async fn update_environment(&self, request: Request<pb::UpdateEnvironmentRequest>) -> Reply<pb::Environment> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        let who = self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let input = EnvironmentInput {
            name: r.name,
            description: r.description,
        };
        let updated = self
            .managed
            .store
            .update_environment(who.actor(), environment, input, precondition(r.version, false))
            .await
            .map_err(store_status)?;
        Ok(Response::new(convert::environment(updated)))
    }

    async fn delete_environment(&self, request: Request<pb::DeleteEnvironmentRequest>) -> Reply<pb::DeleteResponse> {
        let who = self.allow(&request, None).await?;
        let r = request.into_inner();
        self.managed
            .store
            .delete_environment(who.actor(), r.environment.clone(), precondition(r.version, false))
            .await
            .map_err(store_status)?;
        // Gone: no version a replica holds (-1).
        self.managed.environment_changed(r.environment, -1);
        Ok(Response::new(pb::DeleteResponse { config_version: 0 }))
    }

    async fn list_flag_sets(&self, request: Request<pb::ListFlagSetsRequest>) -> Reply<pb::ListFlagSetsResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let listed = self
            .managed
            .store
            .list_flag_sets(environment, page(r.page_size, r.page_token)?)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListFlagSetsResponse {
            flag_sets: listed.items.into_iter().map(convert::flag_set).collect(),
            next_page_token: next_token(listed.next),
        }))
    }

    async fn get_flag_set(&self, request: Request<pb::GetFlagSetRequest>) -> Reply<pb::FlagSet> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let found = self
            .managed
            .store
            .get_flag_set(environment, r.flag_set)
            .await
            .map_err(store_status)?;
        Ok(Response::new(convert::flag_set(found)))
    }

    async fn put_flag_set(&self, request: Request<pb::PutFlagSetRequest>) -> Reply<pb::PutFlagSetResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        let who = self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let input = FlagSetInput {
            name: r.name,
            description: r.description,
            metadata: convert::object(r.metadata),
        };
        let written = self
            .managed
            .store
            .put_flag_set(
                who.actor(),
                environment,
                r.flag_set,
                input,
                precondition(r.version, r.create_only),
            )
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::PutFlagSetResponse {
            config_version: self.wrote(written.config_version),
            flag_set: Some(convert::flag_set(written.value)),
        }))
    }

    async fn delete_flag_set(&self, request: Request<pb::DeleteFlagSetRequest>) -> Reply<pb::DeleteResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        let who = self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let written = self
            .managed
            .store
            .delete_flag_set(who.actor(), environment, r.flag_set, precondition(r.version, false))
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::DeleteResponse {
            config_version: self.wrote(written.config_version),
        }))
    }

    async fn import_flag_set(&self, request: Request<pb::ImportFlagSetRequest>) -> Reply<pb::ImportFlagSetResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        let who = self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let document = serde_json::Value::Object(convert::object(r.document));
        let written = self
            .managed
            .store
            .import(who.actor(), environment, r.flag_set, document)
            .await
            .map_err(store_status)?;
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        Ok(Response::new(pb::ImportFlagSetResponse {
            flags: count(written.value.flags),
            segments: count(written.value.segments),
            changed: count(written.value.changed),
            config_version: self.wrote(written.config_version),
        }))
    }

    async fn export_flag_set(&self, request: Request<pb::ExportFlagSetRequest>) -> Reply<pb::ExportFlagSetResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let document = self
            .managed
            .store
            .export(environment, r.flag_set)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ExportFlagSetResponse {
            document: convert::structure(document),
        }))
    }

    async fn list_flags(&self, request: Request<pb::ListFlagsRequest>) -> Reply<pb::ListFlagsResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let listed = self
            .managed
            .store
            .list_flags(environment, r.flag_set, page(r.page_size, r.page_token)?)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListFlagsResponse {
            flags: listed.items.into_iter().map(convert::flag).collect(),
            next_page_token: next_token(listed.next),
        }))
    }

    async fn get_flag(&self, request: Request<pb::GetFlagRequest>) -> Reply<pb::Flag> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let found = self
            .managed
            .store
            .get_flag(environment, r.flag_set, r.key)
            .await
            .map_err(store_status)?;
        Ok(Response::new(convert::flag(found)))
    }

    async fn put_flag(&self, request: Request<pb::PutFlagRequest>) -> Reply<pb::PutFlagResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        let who = self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let input = flag_input(r.definition, r.description, r.owner, r.tags)?;
        let written = self
            .managed
            .store
            .put_flag(
                who.actor(),
                environment,
                r.flag_set,
                r.key,
                input,
                precondition(r.version, r.create_only),
            )
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::PutFlagResponse {
            config_version: self.wrote(written.config_version),
            flag: Some(convert::flag(written.value)),
        }))
    }

    async fn delete_flag(&self, request: Request<pb::DeleteFlagRequest>) -> Reply<pb::DeleteResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        let who = self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let written = self
            .managed
            .store
            .delete_flag(
                who.actor(),
                environment,
                r.flag_set,
                r.key,
                precondition(r.version, false),
            )
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::DeleteResponse {
            config_version: self.wrote(written.config_version),
        }))
    }

    async fn validate_flag(&self, request: Request<pb::PutFlagRequest>) -> Reply<pb::ValidateResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let checked = match flag_input(r.definition, r.description, r.owner, r.tags) {
            Ok(input) => {
                self.managed
                    .store
                    .validate_flag(environment, r.flag_set, r.key, input)
                    .await
            }
            Err(status) => return Err(status),
        };
        match checked {
            Ok(()) => Ok(Response::new(pb::ValidateResponse {
                valid: true,
                problems: Vec::new(),
            })),
            Err(StoreError::Invalid(problems)) => Ok(Response::new(pb::ValidateResponse {
                valid: false,
                problems: problems
                    .into_iter()
                    .map(|p| pb::Problem {
                        pointer: p.pointer,
                        message: p.message,
                    })
                    .collect(),
            })),
            Err(other) => Err(store_status(other)),
        }
    }

    async fn list_segments(&self, request: Request<pb::ListSegmentsRequest>) -> Reply<pb::ListSegmentsResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let listed = self
            .managed
            .store
            .list_segments(environment, r.flag_set, page(r.page_size, r.page_token)?)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListSegmentsResponse {
            segments: listed.items.into_iter().map(convert::segment).collect(),
            next_page_token: next_token(listed.next),
        }))
    }

    async fn get_segment(&self, request: Request<pb::GetSegmentRequest>) -> Reply<pb::Segment> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let found = self
            .managed
            .store
            .get_segment(environment, r.flag_set, r.key)
            .await
            .map_err(store_status)?;
        Ok(Response::new(convert::segment(found)))
    }

    async fn put_segment(&self, request: Request<pb::PutSegmentRequest>) -> Reply<pb::PutSegmentResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        let who = self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let input = SegmentInput {
            rule: convert::json(r.rule),
            description: r.description,
        };
        let written = self
            .managed
            .store
            .put_segment(
                who.actor(),
                environment,
                r.flag_set,
                r.key,
                input,
                precondition(r.version, r.create_only),
            )
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::PutSegmentResponse {
            config_version: self.wrote(written.config_version),
            segment: Some(convert::segment(written.value)),
        }))
    }

    async fn delete_segment(&self, request: Request<pb::DeleteSegmentRequest>) -> Reply<pb::DeleteResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        let who = self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let written = self
            .managed
            .store
            .delete_segment(
                who.actor(),
                environment,
                r.flag_set,
                r.key,
                precondition(r.version, false),
            )
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::DeleteResponse {
            config_version: self.wrote(written.config_version),
        }))
    }

    async fn list_experiments(
        &self,
        request: Request<pb::ListExperimentsRequest>,
    ) -> Reply<pb::ListExperimentsResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let listed = self
            .managed
            .store
            .list_experiments(environment, page(r.page_size, r.page_token)?)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListExperimentsResponse {
            experiments: listed.items.into_iter().map(convert::experiment).collect(),
            next_page_token: next_token(listed.next),
        }))
    }

    async fn get_experiment(&self, request: Request<pb::GetExperimentRequest>) -> Reply<pb::Experiment> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.allow(&request, Some(&environment)).await?;
        let found = self
            .managed
            .store
            .get_experiment(environment, request.into_inner().key)
            .await
            .map_err(store_status)?;
        Ok(Response::new(convert::experiment(found)))
    }

    async fn put_experiment(&self, request: Request<pb::PutExperimentRequest>) -> Reply<pb::PutExperimentResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        required("flag_set", &request.get_ref().flag_set)?;
        let who = self.allow(&request, Some(&environment)).await?;
        let mut r = request.into_inner();
        let input = convert::experiment_input(&mut r).map_err(store_status)?;
        let written = self
            .managed
            .store
            .put_experiment(
                who.actor(),
                environment,
                r.flag_set,
                r.key,
                input,
                precondition(r.version, r.create_only),
            )
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::PutExperimentResponse {
            config_version: self.wrote(written.config_version),
            experiment: Some(convert::experiment(written.value)),
        }))
    }

    async fn start_experiment(
        &self,
        request: Request<pb::TransitionExperimentRequest>,
    ) -> Reply<pb::PutExperimentResponse> {
        self.transition(request, ExperimentStatus::Running).await
    }

    async fn pause_experiment(
        &self,
        request: Request<pb::TransitionExperimentRequest>,
    ) -> Reply<pb::PutExperimentResponse> {
        self.transition(request, ExperimentStatus::Paused).await
    }

    async fn stop_experiment(
        &self,
        request: Request<pb::TransitionExperimentRequest>,
    ) -> Reply<pb::PutExperimentResponse> {
        self.transition(request, ExperimentStatus::Stopped).await
    }

    async fn archive_experiment(
        &self,
        request: Request<pb::TransitionExperimentRequest>,
    ) -> Reply<pb::PutExperimentResponse> {
        self.transition(request, ExperimentStatus::Archived).await
    }

    async fn delete_experiment(&self, request: Request<pb::DeleteExperimentRequest>) -> Reply<pb::DeleteResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        let who = self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let written = self
            .managed
            .store
            .delete_experiment(who.actor(), environment, r.key, precondition(r.version, false))
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::DeleteResponse {
            config_version: self.wrote(written.config_version),
        }))
    }

    async fn get_experiment_results(
        &self,
        request: Request<pb::GetExperimentResultsRequest>,
    ) -> Reply<pb::ExperimentResults> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let defaults = r.method.is_empty()
            && r.alpha == 0.0
            && r.correction.is_empty()
            && r.control.is_empty()
            && r.cuped_days == 0;
        if defaults
            && !r.refresh
            && let Some(scheduled) = self.managed.results.get(&environment, &r.key)
        {
            return Ok(Response::new((*scheduled).clone()));
        }
        let invalid = |e: String| grpc_status(ErrorKind::InvalidArgument, e);
        let options = ResultsOptions {
            method: choice("method", &r.method).map_err(invalid)?,
            alpha: (r.alpha != 0.0).then_some(r.alpha),
            correction: choice("correction", &r.correction).map_err(invalid)?,
            control: (!r.control.is_empty()).then_some(r.control),
            cuped_days: u32::try_from(r.cuped_days).map_err(|_| invalid("cuped_days must not be negative".into()))?,
        };
        let now = super::now_ms();
        let results =
            vexil_service::results::experiment_results(&*self.managed.store, &environment, &r.key, &options, now)
                .await
                .map_err(|e| match e {
                    ResultsError::Store(e) => store_status(e),
                    ResultsError::Invalid(message) => invalid(message),
                })?;
        Ok(Response::new(convert::results(results, now)))
    }

    async fn list_versions(&self, request: Request<pb::ListVersionsRequest>) -> Reply<pb::ListVersionsResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let listed = self
            .managed
            .store
            .list_versions(environment, page(r.page_size, r.page_token)?)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListVersionsResponse {
            versions: listed.items.into_iter().map(convert::config_version).collect(),
            next_page_token: next_token(listed.next),
        }))
    }

    async fn diff_versions(&self, request: Request<pb::DiffVersionsRequest>) -> Reply<pb::DiffVersionsResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let changes = self
            .managed
            .store
            .diff(environment, r.from, r.to)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::DiffVersionsResponse {
            changes: changes.into_iter().map(convert::change).collect(),
        }))
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Reply<pb::RollbackResponse> {
        let environment = required("environment", &request.get_ref().environment)?.to_owned();
        let who = self.allow(&request, Some(&environment)).await?;
        let r = request.into_inner();
        let written = self
            .managed
            .store
            .rollback(who.actor(), environment, r.version)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::RollbackResponse {
            config_version: self.wrote(written.config_version),
            changes: written.value.into_iter().map(convert::change).collect(),
        }))
    }

    async fn list_audit_entries(
        &self,
        request: Request<pb::ListAuditEntriesRequest>,
    ) -> Reply<pb::ListAuditEntriesResponse> {
        // A key scoped to an environment reads that environment's entries; a global one, any.
        let asked = request.get_ref().environment.clone();
        let who = self
            .allow(&request, (!asked.is_empty()).then_some(asked.as_str()))
            .await?;
        let r = request.into_inner();
        let filter = AuditFilter {
            environment: who
                .environment()
                .map(str::to_owned)
                .or((!r.environment.is_empty()).then_some(r.environment)),
            entity_kind: (!r.entity_kind.is_empty()).then_some(r.entity_kind),
            entity: (!r.entity.is_empty()).then_some(r.entity),
            actor: (!r.actor.is_empty()).then_some(r.actor),
            since: r.since.as_ref().map(convert::millis),
            until: r.until.as_ref().map(convert::millis),
        };
        let listed = self
            .managed
            .store
            .audit(filter, page(r.page_size, r.page_token)?)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListAuditEntriesResponse {
            entries: listed.items.into_iter().map(convert::audit_entry).collect(),
            next_page_token: next_token(listed.next),
        }))
    }

    async fn create_api_key(&self, request: Request<pb::CreateApiKeyRequest>) -> Reply<pb::CreateApiKeyResponse> {
        let asked = request.get_ref().environment.clone();
        let who = self
            .allow(&request, (!asked.is_empty()).then_some(asked.as_str()))
            .await?;
        let r = request.into_inner();
        let Some(role) = Role::parse(&r.role) else {
            return Err(grpc_status(
                ErrorKind::InvalidArgument,
                format!("`{}` is not a role: admin, evaluate or track", r.role),
            ));
        };
        let input = ApiKeyInput {
            name: r.name,
            environment: (!r.environment.is_empty()).then_some(r.environment),
            role,
        };
        let created = self
            .managed
            .store
            .create_api_key(who.actor(), input)
            .await
            .map_err(store_status)?;
        self.managed.keys_changed();
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(convert::api_key(created.key)),
            secret: created.secret,
        }))
    }

    async fn list_api_keys(&self, request: Request<pb::ListApiKeysRequest>) -> Reply<pb::ListApiKeysResponse> {
        let asked = request.get_ref().environment.clone();
        let who = self
            .allow(&request, (!asked.is_empty()).then_some(asked.as_str()))
            .await?;
        let r = request.into_inner();
        let environment = who
            .environment()
            .map(str::to_owned)
            .or((!r.environment.is_empty()).then_some(r.environment));
        let listed = self
            .managed
            .store
            .list_api_keys(environment, page(r.page_size, r.page_token)?)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: listed.items.into_iter().map(convert::api_key).collect(),
            next_page_token: next_token(listed.next),
        }))
    }

    async fn revoke_api_key(&self, request: Request<pb::RevokeApiKeyRequest>) -> Reply<pb::ApiKey> {
        let who = self.allow(&request, None).await?;
        let id = request.into_inner().id;
        let revoked = self
            .managed
            .store
            .revoke_api_key(who.actor(), id)
            .await
            .map_err(store_status)?;
        self.managed.keys_changed();
        Ok(Response::new(convert::api_key(revoked)))
    }
}

/// A results option from its snake_case name (`""`: the default).
fn choice<T: serde::de::DeserializeOwned + Default>(field: &str, name: &str) -> Result<T, String> {
    if name.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_value(serde_json::Value::String(name.to_owned())).map_err(|_| format!("`{name}` is not a {field}"))
}

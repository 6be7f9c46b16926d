//! How a node proves who it is before it has a certificate, in a cluster:
//! its pod's projected ServiceAccount token (audience `lacewing`), checked
//! with a TokenReview. The token must belong to the node daemon's
//! ServiceAccount and be bound to a pod on the node it names (the API
//! server puts the node's name in the review's `extra` for pod-bound tokens,
//! Kubernetes 1.30 and later), so a node can only get its own certificate.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::{Api, Client, api::PostParams};

/// The audience node tokens are minted for.
pub const AUDIENCE: &str = "lacewing";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

pub struct TokenReviewer {
    pub client: Client,
    /// `system:serviceaccount:<namespace>:<name>` of the node daemons.
    pub service_account: String,
}

/// Why a bootstrap token does not prove the node daemon on a node.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error(
        "TokenReview failed: {0} (does the controller's ServiceAccount have the system:auth-delegator role?)"
    )]
    Api(#[from] kube::Error),
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("the token is {got}'s, not the node daemon's ({want})")]
    WrongAccount { got: String, want: String },
    #[error(
        "the token is bound to node {bound:?}, not {node} (is it a pod-bound projected token, Kubernetes 1.30+?)"
    )]
    WrongNode { bound: Vec<String>, node: String },
}

impl TokenReviewer {
    /// Whether `token` proves it comes from the node daemon on `node`.
    pub async fn review(&self, token: &str, node: &str) -> Result<(), ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(ReviewError::Invalid(status.error.unwrap_or_default()));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.service_account {
            return Err(ReviewError::WrongAccount {
                got: username,
                want: self.service_account.clone(),
            });
        }
        let bound: Vec<String> = user
            .extra
            .and_then(|mut e| e.remove(NODE_NAME_EXTRA))
            .unwrap_or_default();
        if bound != [node] {
            return Err(ReviewError::WrongNode {
                bound,
                node: node.to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock;

    use super::*;

    /// A mock API server answering one TokenReview with `status`; checks the
    /// request asks for our audience.
    async fn reviewed(status: Value) -> Result<(), ReviewError> {
        let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.method(), Method::POST);
            assert_eq!(
                req.uri().path(),
                "/apis/authentication.k8s.io/v1/tokenreviews"
            );
            let body: Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            assert_eq!(body["spec"]["audiences"], json!(["lacewing"]));
            let mut review = body;
            review["status"] = status;
            let mut resp = Response::new(Body::from(serde_json::to_vec(&review).unwrap()));
            *resp.status_mut() = StatusCode::CREATED;
            send.send_response(resp);
        });
        TokenReviewer {
            client: Client::new(svc, "default"),
            service_account: "system:serviceaccount:lacewing-system:lacewing-node".into(),
        }
        .review("token", "n1")
        .await
    }

    fn user(name: &str, node: &str) -> Value {
        json!({"authenticated": true, "audiences": ["lacewing"],
               "user": {"username": name, "uid": "u",
                        "extra": {"authentication.kubernetes.io/node-name": [node],
                                  "authentication.kubernetes.io/pod-name": ["lacewing-node-abcde"]}}})
    }

    #[tokio::test]
    async fn only_the_node_daemons_token_bound_to_that_node_passes() {
        let sa = "system:serviceaccount:lacewing-system:lacewing-node";
        assert!(reviewed(user(sa, "n1")).await.is_ok());
        let err = reviewed(user(sa, "n2")).await.unwrap_err().to_string();
        assert!(err.contains("bound to node [\"n2\"], not n1"), "{err}");
        let err = reviewed(user("system:serviceaccount:default:app", "n1"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not the node daemon's"), "{err}");
        let err = reviewed(json!({"authenticated": false, "error": "token expired"}))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("token expired"), "{err}");
    }
}
